//! `kiln keys`: creating, listing and revoking API keys, and setting a tenant's limits, on the
//! key store the gateways read: the job store's Redis, or the embedded backend's keys file.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_common::Backend;
use kiln_common::config::{BackendArgs, parse_duration};
use kiln_common::tenancy::file::FileKeys;
use kiln_common::tenancy::{self, KeyStore, Limits, NewKey, Scope};
use kiln_proto::now_millis;

#[derive(Args, Debug)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
    /// Where the keys are: with `--keys-file` (`KILN_KEYS_FILE`), the embedded backend's file;
    /// else the Redis of `--redis-url`.
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// A limit flag set: each is optional and falls back to the next level (key, tenant, defaults).
#[derive(Args, Debug, Clone, Copy)]
pub struct LimitFlags {
    /// Requests per second, sustained.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests at once above the rate.
    #[arg(long)]
    pub burst: Option<u32>,
    /// Jobs accepted and not finished, at most.
    #[arg(long)]
    pub max_in_flight: Option<u32>,
    /// Seconds of worker run time per sliding hour.
    #[arg(long)]
    pub compute_s_per_hour: Option<f64>,
}

impl From<LimitFlags> for Limits {
    fn from(f: LimitFlags) -> Self {
        Limits {
            rate: f.rate,
            burst: f.burst,
            max_in_flight: f.max_in_flight,
            compute_s_per_hour: f.compute_s_per_hour,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key and print it once (only its hash is stored).
    Create {
        #[arg(long)]
        tenant: String,
        /// `jobs:submit`, `jobs:read`, `admin` (all); repeat or separate with commas.
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_scope)]
        scope: Vec<Scope>,
        /// Expire the key this long from now (`30d` is `720h`).
        #[arg(long, value_parser = parse_duration)]
        expires: Option<Duration>,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// Print every key as a JSON line (never its secret or hash).
    List,
    /// Revoke a key: every gateway answers it 401 within a second.
    Revoke { id: String },
    /// Set a tenant's limits (those its keys do not set themselves).
    Limits {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        limits: LimitFlags,
    },
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    Scope::parse(s).ok_or_else(|| format!("unknown scope {s:?}: jobs:submit, jobs:read or admin"))
}

pub async fn command(args: KeysArgs) -> anyhow::Result<()> {
    let store: Arc<dyn KeyStore> = match &args.backend.keys_file {
        Some(path) => Arc::new(FileKeys::new(Some(path.clone()))),
        None => Backend::external(&args.backend)?.keys,
    };
    match args.command {
        KeysCommand::Create { tenant, scope, expires, limits } => {
            let now = now_millis();
            let new = NewKey {
                tenant,
                scopes: scope.into_iter().collect::<BTreeSet<_>>(),
                expires_at: expires.map(|e| now + e.as_millis() as i64),
                limits: limits.into(),
            };
            let issued = tenancy::issue(store.as_ref(), new, now).await?;
            println!("{}", serde_json::json!({ "token": issued.token, "key": issued.key.listing() }));
            eprintln!("kiln keys: store the token now; it is not shown again");
        }
        KeysCommand::List => {
            for key in store.list().await? {
                println!("{}", key.listing());
            }
        }
        KeysCommand::Revoke { id } => {
            let key = store.revoke(&id, now_millis()).await.with_context(|| format!("revoking {id}"))?;
            println!("{}", key.listing());
        }
        KeysCommand::Limits { tenant, limits } => {
            tenancy::check_tenant(&tenant)?;
            store.set_tenant_limits(&tenant, &limits.into()).await?;
            println!("{}", serde_json::to_string(&Limits::from(limits))?);
        }
    }
    Ok(())
}
