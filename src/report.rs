//! How a training run shows its progress on stderr: on a terminal, a bar with the loss,
//! learning rate and tokens/s; off a terminal (nohup, Slurm, CI logs), where the bar is hidden,
//! a plain line every `training.log_every` steps instead. Validations and notes are a line
//! each either way.

use indicatif::ProgressBar;
use std::time::{Duration, Instant};
use train::{Event, Reporter};

/// The terminal side of a training run.
pub struct RunProgress {
    bar: ProgressBar,
    /// When and at which step this invocation started, for the ETA of the plain lines.
    start: (Instant, u64),
}

impl RunProgress {
    /// A bar that is shown once the run says how many steps it has.
    pub fn new() -> Self {
        Self {
            bar: data::progress::bar(0, "steps"),
            start: (Instant::now(), 0),
        }
    }

    /// Prints a line above the bar, also when the bar is hidden.
    fn say(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    /// The time left at the pace of this invocation, once a step has been made.
    fn eta(&self, step: u64) -> Option<Duration> {
        let done = step.checked_sub(self.start.1).filter(|d| *d > 0)?;
        let left = self.bar.length()?.saturating_sub(step);
        Some(self.start.0.elapsed().mul_f64(left as f64 / done as f64))
    }
}

impl Default for RunProgress {
    fn default() -> Self {
        Self::new()
    }
}

/// `1h02m03s`, `4m05s` or `6s`.
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, sec) => format!("{h}h{min:02}m{sec:02}s"),
    }
}

impl Reporter for RunProgress {
    fn report(&mut self, event: Event) {
        match event {
            Event::Started { step, total } => {
                self.bar.set_length(total);
                self.bar.set_position(step);
                self.start = (Instant::now(), step);
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
            Event::Logged {
                step,
                loss,
                lr,
                tokens_per_sec,
            } if self.bar.is_hidden() => {
                let total = self.bar.length().unwrap_or(step);
                let eta = self.eta(step).map_or("?".into(), duration);
                eprintln!(
                    "step {step:>6}/{total}: loss {loss:.4}, lr {lr:.2e}, {tokens_per_sec:.0} tok/s, ETA {eta}"
                );
            }
            Event::Logged { .. } => {}
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

#[cfg(test)]
mod tests {
    use super::duration;
    use std::time::Duration;

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(duration(Duration::from_secs(6)), "6s");
        assert_eq!(duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(duration(Duration::from_secs(3723)), "1h02m03s");
    }
}
