//! Running totals of per-token negative log-likelihoods and the figures derived from them.

use serde::Serialize;

/// Per-token NLLs added up (in f64) together with the bytes of text they cover.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    nll_sum: f64,
    nll_sq_sum: f64,
    tokens: u64,
    bytes: u64,
}

impl Tally {
    /// Adds one scored token's NLL (nats).
    pub fn add_token(&mut self, nll: f64) {
        self.nll_sum += nll;
        self.nll_sq_sum += nll * nll;
        self.tokens += 1;
    }

    /// Adds UTF-8 bytes of scored text.
    pub fn add_bytes(&mut self, bytes: u64) {
        self.bytes += bytes;
    }

    /// Adds another tally into this one.
    pub fn merge(&mut self, other: &Tally) {
        self.nll_sum += other.nll_sum;
        self.nll_sq_sum += other.nll_sq_sum;
        self.tokens += other.tokens;
        self.bytes += other.bytes;
    }

    /// The summary figures; `None` when no token was scored.
    pub fn metrics(&self) -> Option<Metrics> {
        if self.tokens == 0 {
            return None;
        }
        let n = self.tokens as f64;
        let mean = self.nll_sum / n;
        // Sample variance of the per-token NLLs; the standard error treats tokens as
        // independent, which understates it for correlated text but is what is usually quoted.
        let variance = if self.tokens > 1 {
            ((self.nll_sq_sum - n * mean * mean) / (n - 1.0)).max(0.0)
        } else {
            0.0
        };
        Some(Metrics {
            nll_sum: self.nll_sum,
            nll_mean: mean,
            nll_stderr: (variance / n).sqrt(),
            perplexity: mean.exp(),
            bits_per_byte: if self.bytes > 0 {
                self.nll_sum / std::f64::consts::LN_2 / self.bytes as f64
            } else {
                f64::NAN
            },
            tokens: self.tokens,
            bytes: self.bytes,
        })
    }
}

/// What an evaluation reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Metrics {
    /// Total NLL in nats.
    pub nll_sum: f64,
    /// Mean NLL per scored token in nats.
    pub nll_mean: f64,
    /// Standard error of `nll_mean`.
    pub nll_stderr: f64,
    /// `exp(nll_mean)`.
    pub perplexity: f64,
    /// `nll_sum / ln 2 / bytes`: comparable across tokenizers.
    pub bits_per_byte: f64,
    /// Tokens scored.
    pub tokens: u64,
    /// UTF-8 bytes of the scored text.
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_follow_their_definitions() {
        let mut t = Tally::default();
        for v in [1.0, 2.0, 3.0] {
            t.add_token(v);
        }
        t.add_bytes(6);
        let m = t.metrics().unwrap();
        assert_eq!(m.tokens, 3);
        assert!((m.nll_mean - 2.0).abs() < 1e-12);
        assert!((m.perplexity - 2f64.exp()).abs() < 1e-12);
        assert!((m.nll_stderr - (1.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((m.bits_per_byte - 6.0 / std::f64::consts::LN_2 / 6.0).abs() < 1e-12);
        let mut total = Tally::default();
        total.merge(&t);
        total.merge(&t);
        assert_eq!(total.metrics().unwrap().tokens, 6);
        assert!(Tally::default().metrics().is_none());
    }
}
