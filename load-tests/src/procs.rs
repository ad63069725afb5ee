//! The system under test as separate processes — `kiln gateway` and `kiln worker` on a queue and
//! key prefix of their own — and the worker's memory as the kernel reports it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::Args;

/// A `kiln gateway` or `kiln worker` process, killed on drop.
pub struct Proc {
    child: tokio::process::Child,
    pub url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Resident memory of a process, MiB.
#[derive(Debug, Clone, Copy)]
pub struct Rss {
    /// VmHWM: the peak since the process started.
    pub peak_mib: f64,
    /// VmRSS: now.
    pub current_mib: f64,
}

impl Proc {
    fn command(args: &Args, role: &str, prefix: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&args.kiln);
        cmd.arg(role)
            .env("KILN_AMQP_URL", &args.amqp_url)
            .env("KILN_REDIS_URL", &args.redis_url)
            .env("KILN_QUEUE_PREFIX", prefix)
            .env("KILN_KEY_PREFIX", format!("{prefix}:"))
            .env("KILN_MODELS_DIR", &args.models_dir)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    pub async fn gateway(args: &Args, prefix: &str) -> anyhow::Result<Self> {
        // The benchmarks measure the job path; keys and their limits are not part of it.
        Self::gateway_with(args, prefix, &[("KILN_AUTH", "off")]).await
    }

    /// A gateway with `env` set, ready when this returns.
    pub async fn gateway_with(args: &Args, prefix: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = Self::command(args, "gateway", prefix);
        cmd.env("KILN_LISTEN", format!("127.0.0.1:{port}"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {} gateway", args.kiln.display()))?;
        let mut me = Self { child, url: format!("http://127.0.0.1:{port}") };
        let http = kiln_common::tls::http_client().build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", me.url)).send().await
                && r.status() == 200
            {
                return Ok(me);
            }
            if let Some(status) = me.child.try_wait()? {
                bail!("the gateway exited before it was ready: {status}");
            }
            if Instant::now() > deadline {
                bail!("the gateway at {} did not become ready", me.url);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A key for `tenant` that may submit and read, made with `kiln keys create` on the store of
    /// the processes under `prefix`; answers its token.
    pub async fn key(args: &Args, prefix: &str, tenant: &str) -> anyhow::Result<String> {
        let out = Self::command(args, "keys", prefix)
            .args(["create", "--tenant", tenant, "--scope", "jobs:submit,jobs:read"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output()
            .await
            .context("running kiln keys create")?;
        if !out.status.success() {
            bail!("kiln keys create for {tenant} failed: {}", out.status);
        }
        let created: serde_json::Value = serde_json::from_slice(&out.stdout).context("kiln keys create's output")?;
        created["token"].as_str().map(str::to_owned).context("kiln keys create printed no token")
    }

    /// A worker serving `model`, with `--worker-env` and then `extra_env` (which wins) set.
    pub fn worker(args: &Args, prefix: &str, model: &str, extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut cmd = Self::command(args, "worker", prefix);
        cmd.env("KILN_WORKER_MODELS", model);
        for (k, v) in &args.worker_env {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {} worker", args.kiln.display()))?;
        Ok(Self { child, url: String::new() })
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self, what: &str) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("the {what} exited: {status}"),
            None => Ok(()),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resident memory from `/proc/<pid>/status`.
    pub fn rss(&self) -> anyhow::Result<Rss> {
        rss_of(self.child.id().context("the process has exited")?)
    }

    /// Kills the process and waits for it to be gone, so the next one has the cores (and the
    /// queue) to itself.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        // An error here means it has already exited; the wait below reaps it either way.
        let _ = self.child.start_kill();
        self.child.wait().await?;
        Ok(())
    }
}

/// Resident memory of process `pid` from `/proc/<pid>/status`.
pub fn rss_of(pid: u32) -> anyhow::Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |field: &str| -> anyhow::Result<f64> {
        let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field} for {pid}"))?;
        let value = line.split_whitespace().nth(1).with_context(|| format!("malformed {line:?}"))?;
        value.parse::<f64>().with_context(|| format!("malformed {line:?}"))
    };
    Ok(Rss { peak_mib: kib("VmHWM:")? / 1024.0, current_mib: kib("VmRSS:")? / 1024.0 })
}
