//! How a training run shows its progress on stderr: a bar with the loss, learning rate and
//! tokens/s (hidden when stderr is not a terminal), and a line per validation or note, printed
//! above the bar.

use indicatif::ProgressBar;
use train::{Event, Reporter};

/// The terminal side of a training run.
pub struct RunProgress {
    bar: ProgressBar,
}

impl RunProgress {
    /// A bar that is shown once the run says how many steps it has.
    pub fn new() -> Self {
        Self {
            bar: data::progress::bar(0, "steps"),
        }
    }

    /// Prints a line above the bar, also when the bar is hidden.
    fn say(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }
}

impl Default for RunProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter for RunProgress {
    fn report(&mut self, event: Event) {
        match event {
            Event::Started { step, total } => {
                self.bar.set_length(total);
                self.bar.set_position(step);
            }
            Event::Stepped {
                step,
                loss,
                lr,
                tokens_per_sec,
            } => {
                self.bar.set_position(step);
                self.bar
                    .set_message(format!("loss {loss:.4} lr {lr:.2e} {tokens_per_sec:.0} tok/s"));
            }
            Event::Validated {
                step,
                train_loss,
                val_loss,
                best,
            } => self.say(&format!(
                "step {step:>6}: train loss {train_loss:.4}, val loss {val_loss:.4}, val ppl {:.2}{}",
                val_loss.exp(),
                if best { " (best)" } else { "" }
            )),
            Event::Note(note) => self.say(&note),
            Event::Stopped { interrupted: true } => self.bar.abandon(),
            Event::Stopped { interrupted: false } => self.bar.finish_and_clear(),
        }
    }
}
