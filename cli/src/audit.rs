//! `kiln audit`: verifying a gateway's audit log file (the hash chain, and with the key its signed
//! checkpoints) and exporting the entries of a time range as JSON lines.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use kiln_common::audit::{self, VerifyReport, parse_time};
use kiln_common::config::Secret;
use time::OffsetDateTime;

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check every entry of an audit log: its hash, its place in the chain (`seq`, `prev`) and,
    /// with the key, each checkpoint's MAC. Names the first bad entry (line and seq) and exits
    /// non-zero; without the key a rewrite of the whole file cannot be detected.
    Verify {
        /// The audit log file (a gateway's `KILN_AUDIT_FILE`).
        #[arg(long)]
        file: PathBuf,
        /// The checkpoint key (`KILN_AUDIT_KEY`); prefer the environment variable to the flag,
        /// which other users of the machine can see.
        #[arg(long, env = "KILN_AUDIT_KEY", hide_env_values = true)]
        key: Option<Secret>,
    },
    /// Print the entries whose time is in [since, until) as JSON lines, as they are in the file.
    /// Does not verify them: run `kiln audit verify` for that.
    Export {
        /// The audit log file.
        #[arg(long)]
        file: PathBuf,
        /// Earliest time included, RFC 3339 (`2025-06-01T00:00:00Z`).
        #[arg(long, value_parser = parse_time)]
        since: Option<OffsetDateTime>,
        /// First time excluded, RFC 3339.
        #[arg(long, value_parser = parse_time)]
        until: Option<OffsetDateTime>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Runs one `kiln audit` command; a log that fails verification is an error naming the entry.
pub fn command(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { file, key } => {
            let report = audit::verify(&file, key.as_ref().map(|k| k.expose().as_bytes()))?;
            println!("{}", summary(&report, key.is_some()));
            match report.first_bad {
                None => Ok(()),
                Some(bad) => {
                    let seq = bad.seq.map_or_else(|| "unreadable".to_owned(), |s| s.to_string());
                    anyhow::bail!("{}: line {} (seq {seq}) is bad: {}", file.display(), bad.line, bad.why)
                }
            }
        }
        AuditCommand::Export { file, since, until, out } => {
            let n = match out {
                Some(path) => {
                    let f =
                        std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
                    audit::export(&file, since, until, std::io::BufWriter::new(f))?
                }
                None => audit::export(&file, since, until, std::io::BufWriter::new(std::io::stdout().lock()))?,
            };
            writeln!(std::io::stderr(), "exported {n} entries")?;
            Ok(())
        }
    }
}

fn summary(r: &VerifyReport, keyed: bool) -> String {
    let verdict = if r.is_ok() { "ok" } else { "FAILED" };
    let mut s = format!("{verdict}: {} sound entries, {} checkpoints", r.entries, r.checkpoints);
    if keyed {
        s.push_str(&format!(" ({} MACs verified)", r.checkpoints_verified));
    }
    match r.last_checkpoint_seq {
        Some(seq) => s.push_str(&format!("; last checkpoint at seq {seq}, {} entries after it", r.unsealed)),
        None => s.push_str(&format!("; no checkpoint, {} entries unsealed", r.unsealed)),
    }
    if !keyed {
        s.push_str("\nwithout --key (KILN_AUDIT_KEY) checkpoint MACs are not checked: a rewritten chain would pass");
    }
    s
}
