//! The progress bar of an epoch (indicatif, on standard error): steps, loss, images per
//! second, elapsed time and ETA. It draws nothing when standard error is not a terminal
//! (CI logs, pipes) and with `--quiet`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress of one epoch.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar for `total` steps of epoch `epoch` of `epochs`; hidden unless `enabled`.
    pub fn new(epoch: usize, epochs: usize, total: usize, enabled: bool) -> Self {
        let target = match enabled {
            true => ProgressDrawTarget::stderr(),
            false => ProgressDrawTarget::hidden(),
        };
        let bar = ProgressBar::with_draw_target(Some(total as u64), target);
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} {msg} {elapsed} eta {eta}",
            )
            .expect("the template is valid")
            .progress_chars("#>-"),
        );
        bar.set_prefix(format!("{epoch}/{epochs}"));
        Self { bar }
    }

    /// One step done, with its loss; `images` seen so far in `seconds`.
    pub fn step(&mut self, loss: f64, images: usize, seconds: f64) {
        let rate = images as f64 / seconds.max(1e-9);
        self.bar
            .set_message(format!("loss {loss:.5} {rate:.0} img/s"));
        self.bar.inc(1);
    }

    /// Clears the bar (the epoch's summary line follows).
    pub fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}
