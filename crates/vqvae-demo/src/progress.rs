//! A progress bar per epoch on standard error (a line per quarter when it is not a terminal).

use std::io::{IsTerminal, Write};

/// Progress of one epoch.
pub struct Progress {
    epoch: usize,
    epochs: usize,
    total: usize,
    done: usize,
    enabled: bool,
    terminal: bool,
    last_quarter: usize,
}

impl Progress {
    /// A bar for `total` steps of epoch `epoch` of `epochs`.
    pub fn new(epoch: usize, epochs: usize, total: usize, enabled: bool) -> Self {
        Self {
            epoch,
            epochs,
            total: total.max(1),
            done: 0,
            enabled,
            terminal: std::io::stderr().is_terminal(),
            last_quarter: 0,
        }
    }

    /// One step done, with its loss; `images` seen so far in `seconds`.
    pub fn step(&mut self, loss: f64, images: usize, seconds: f64) {
        self.done += 1;
        if !self.enabled {
            return;
        }
        let rate = images as f64 / seconds.max(1e-9);
        let line = format!(
            "epoch {}/{} [{}] {}/{} loss {loss:.5} {rate:.0} img/s",
            self.epoch,
            self.epochs,
            bar(self.done, self.total, 30),
            self.done,
            self.total
        );
        let mut err = std::io::stderr();
        if self.terminal {
            let _ = write!(err, "\r{line}");
            let _ = err.flush();
        } else {
            let quarter = self.done * 4 / self.total;
            if quarter > self.last_quarter {
                self.last_quarter = quarter;
                let _ = writeln!(err, "{line}");
            }
        }
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.enabled && self.terminal {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = done * width / total.max(1);
    format!("{}{}", "#".repeat(filled), "-".repeat(width - filled))
}
