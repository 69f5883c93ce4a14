//! A progress bar for long work on a terminal (`strata model fetch`,
//! `strata simulate`): one line on stderr, redrawn in place. When stderr
//! is not a terminal (CI, a log file) it prints each stage once instead,
//! so logs stay readable.

use std::io::{IsTerminal, Write};

pub struct Bar {
    label: String,
    tty: bool,
    shown: Option<(i64, String)>,
}

const WIDTH: usize = 30;

impl Bar {
    pub fn new(label: impl Into<String>) -> Self {
        Bar {
            label: label.into(),
            tty: std::io::stderr().is_terminal(),
            shown: None,
        }
    }

    /// `done` of the whole (0–1), in `stage`.
    pub fn set(&mut self, done: f64, stage: &str) {
        let pct = (done.clamp(0.0, 1.0) * 100.0) as i64;
        let now = (pct, stage.to_owned());
        if self.shown.as_ref() == Some(&now) {
            return;
        }
        let new_stage = self.shown.as_ref().is_none_or(|(_, s)| s != stage);
        self.shown = Some(now);
        if self.tty {
            let filled = (done.clamp(0.0, 1.0) * WIDTH as f64) as usize;
            eprint!(
                "\r\x1b[2K{} [{}{}] {pct:>3}% {stage}",
                self.label,
                "#".repeat(filled),
                "-".repeat(WIDTH - filled)
            );
            let _ = std::io::stderr().flush();
        } else if new_stage && !stage.is_empty() {
            eprintln!("{}: {stage}", self.label);
        }
    }

    /// Ends the bar's line with `stage`.
    pub fn finish(&mut self, stage: &str) {
        if self.tty {
            eprintln!("\r\x1b[2K{} {stage}", self.label);
        }
    }
}
