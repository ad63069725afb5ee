//! Progress on stderr: a redrawn bar with done/total, rate and ETA on a terminal; a plain status
//! line every few seconds otherwise (logs, CI). Item messages go through [`Progress::println`] so
//! they never interleave with the bar.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub struct Progress {
    total: u64,
    /// Items finished this run (succeeded or failed), which the rate is computed from.
    pub finished: AtomicU64,
    /// Items found done from an earlier run.
    pub skipped: AtomicU64,
    pub failed: AtomicU64,
    started: Instant,
    tty: bool,
    enabled: bool,
    /// Serialises writes to stderr and remembers whether a bar is on screen.
    screen: Mutex<bool>,
}

impl Progress {
    pub fn new(total: usize, enabled: bool) -> Self {
        Self {
            total: total as u64,
            finished: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            enabled,
            screen: Mutex::new(false),
        }
    }

    /// Prints one message above the bar.
    pub fn println(&self, message: &str) {
        if !self.enabled {
            return;
        }
        let mut bar_shown = self.screen.lock().unwrap_or_else(|p| p.into_inner());
        let mut err = std::io::stderr().lock();
        if *bar_shown {
            let _ = write!(err, "\r\x1b[2K");
            *bar_shown = false;
        }
        let _ = writeln!(err, "{message}");
    }

    /// The status line: `[#####.....] 120/3000 (3 failed) 4.2/s ETA 11m20s`.
    pub fn line(&self) -> String {
        let finished = self.finished.load(Ordering::Relaxed);
        let done = finished + self.skipped.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 { finished as f64 / elapsed } else { 0.0 };
        let width = 30usize;
        let filled = if self.total == 0 { width } else { (done as usize * width) / self.total as usize };
        let bar: String = "#".repeat(filled.min(width)) + &".".repeat(width - filled.min(width));
        let remaining = self.total.saturating_sub(done);
        let eta = if remaining == 0 {
            "done".to_owned()
        } else if rate > 0.0 {
            format!("ETA {}", human(Duration::from_secs_f64(remaining as f64 / rate)))
        } else {
            "ETA ?".to_owned()
        };
        let failed = if failed > 0 { format!(" ({failed} failed)") } else { String::new() };
        format!("[{bar}] {done}/{}{failed} {rate:.1}/s {eta}", self.total)
    }

    /// Draws until `stop`: every 200 ms on a terminal, every 10 s (when changed) elsewhere.
    pub async fn render(&self, stop: CancellationToken) {
        if !self.enabled {
            return;
        }
        let every = if self.tty { Duration::from_millis(200) } else { Duration::from_secs(10) };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = String::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let line = self.line();
            let mut bar_shown = self.screen.lock().unwrap_or_else(|p| p.into_inner());
            let mut err = std::io::stderr().lock();
            if self.tty {
                let _ = write!(err, "\r\x1b[2K{line}");
                let _ = err.flush();
                *bar_shown = true;
            } else if line != last {
                let _ = writeln!(err, "kiln batch: {line}");
            }
            last = line;
        }
        self.clear();
    }

    fn clear(&self) {
        let mut bar_shown = self.screen.lock().unwrap_or_else(|p| p.into_inner());
        if *bar_shown {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
            *bar_shown = false;
        }
    }
}

/// `1h02m`, `3m20s`, `12s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_counts_and_the_bar() {
        let p = Progress::new(10, false);
        p.skipped.store(2, Ordering::Relaxed);
        p.finished.store(3, Ordering::Relaxed);
        p.failed.store(1, Ordering::Relaxed);
        let line = p.line();
        assert!(line.starts_with("[###############...............] 5/10 (1 failed) "), "{line}");
        assert!(line.contains("ETA "), "{line}");
        assert_eq!(
            (human(Duration::from_secs(75)), human(Duration::from_secs(3720))),
            ("1m15s".into(), "1h02m".into())
        );
    }
}
