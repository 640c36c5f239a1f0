//! Progress on stderr: a bar per training run (and per calibration) when asked for, else one line
//! per epoch.

use indicatif::{ProgressBar, ProgressStyle};
use shrink_core::train::{EpochRecord, TrainObserver};

/// A training run's progress: the bar (when progress is shown) and its epoch lines.
pub struct Progress {
    bar: Option<ProgressBar>,
    epochs: usize,
}

impl Progress {
    /// A bar labelled `label` for `epochs` epochs; without `show`, epoch lines only.
    pub fn new(show: bool, epochs: usize, label: &str) -> Self {
        let bar = show.then(|| {
            let bar = ProgressBar::new(1);
            bar.set_style(
                ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]")
                    .expect("valid template"),
            );
            bar.set_prefix(label.to_string());
            bar
        });
        Self { bar, epochs }
    }

    /// Clears the bar once its run has ended.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

impl TrainObserver for Progress {
    fn on_step(&mut self, epoch: usize, step: usize, steps: usize, loss: f64) {
        if let Some(bar) = &self.bar {
            if step == 1 {
                bar.set_length(steps as u64);
                bar.set_position(0);
            }
            bar.set_message(format!("epoch {epoch}/{} loss {loss:.4}", self.epochs));
            bar.inc(1);
        }
    }

    fn on_epoch(&mut self, r: &EpochRecord) {
        let val = r.validation.as_ref().map(|v| format!(" val acc {:.4}", v.top1)).unwrap_or_default();
        let line = format!(
            "epoch {}/{}: loss {:.4} train acc {:.4}{val} lr {:.4} ({:.1}s)",
            r.epoch, self.epochs, r.train_loss, r.train_accuracy, r.lr, r.seconds
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// A bar over the calibration batches (ticked as each batch is drawn), when progress is shown.
pub fn calibration_bar(show: bool, batches: usize) -> Option<ProgressBar> {
    (show && batches > 0).then(|| {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(
            ProgressStyle::with_template("calibration {bar:30} {pos}/{len} batches [{elapsed}<{eta}]")
                .expect("valid template"),
        );
        bar
    })
}
