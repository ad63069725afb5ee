//! The run's results: every figure printed as it comes and kept, in order, for the Markdown
//! report; remarks (texts reused, backlog sizes capped) kept with them.

use std::path::Path;

use anyhow::Context;

#[derive(Default)]
pub struct Report {
    rows: Vec<(String, String)>,
    remarks: Vec<String>,
}

impl Report {
    pub fn note(&mut self, name: &str, value: String) {
        println!("{name:<64} {value}");
        self.rows.push((name.to_owned(), value));
    }

    /// A ratio against its target, e.g. `target = "≥ 0.9"`.
    pub fn ratio(&mut self, name: &str, value: f64, target: &str) {
        self.note(&format!("RATIO {name}"), format!("{value:.3} (target {target})"));
    }

    pub fn remark(&mut self, text: String) {
        println!("  note: {text}");
        self.remarks.push(text);
    }

    pub fn write_markdown(&self, out: &Path) -> anyhow::Result<()> {
        let mut md = String::from("| measure | value |\n| --- | --- |\n");
        for (name, value) in &self.rows {
            md.push_str(&format!("| {name} | {value} |\n"));
        }
        if !self.remarks.is_empty() {
            md.push_str("\nNotes:\n\n");
            for r in &self.remarks {
                md.push_str(&format!("- {r}\n"));
            }
        }
        std::fs::write(out, md).with_context(|| format!("writing {}", out.display()))
    }
}

/// `a / b`, NaN when either is missing.
pub fn div(a: Option<f64>, b: Option<f64>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => a / b,
        _ => f64::NAN,
    }
}
