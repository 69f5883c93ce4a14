//! Latency percentiles for the controller's SLO signals, on any clock: the
//! gateway feeds it on the real clock, the simulator on its virtual one.

use std::collections::VecDeque;
use std::time::Duration;

/// The nearest-rank `q` percentile (0–1) of sorted values; `None` when empty.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Time to first token and time per output token of the streamed requests
/// of the last `SPAN` (at most `MAX` of them), for p95s against the pool's
/// objectives. Times are offsets on the caller's clock.
#[derive(Debug, Clone, Default)]
pub struct LatencyWindow {
    samples: VecDeque<(Duration, f64, Option<f64>)>,
}

impl LatencyWindow {
    pub const SPAN: Duration = Duration::from_secs(30);
    const MAX: usize = 8192;

    pub fn record(&mut self, at: Duration, ttft_ms: f64, tpot_ms: Option<f64>) {
        if self.samples.len() == Self::MAX {
            self.samples.pop_front();
        }
        self.samples.push_back((at, ttft_ms, tpot_ms));
    }

    /// p95 TTFT and p95 TPOT (milliseconds) over the `SPAN` before `now`.
    pub fn p95(&mut self, now: Duration) -> (Option<f64>, Option<f64>) {
        while self
            .samples
            .front()
            .is_some_and(|f| now.saturating_sub(f.0) > Self::SPAN)
        {
            self.samples.pop_front();
        }
        let mut ttft: Vec<f64> = self.samples.iter().map(|x| x.1).collect();
        let mut tpot: Vec<f64> = self.samples.iter().filter_map(|x| x.2).collect();
        ttft.sort_by(f64::total_cmp);
        tpot.sort_by(f64::total_cmp);
        (percentile(&ttft, 0.95), percentile(&tpot, 0.95))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_the_nearest_rank_over_the_last_half_minute() {
        assert_eq!(percentile(&[], 0.95), None);
        assert_eq!(percentile(&[7.0], 0.95), Some(7.0));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 0.95), Some(95.0));
        let mut w = LatencyWindow::default();
        w.record(Duration::from_secs(0), 900.0, None);
        w.record(Duration::from_secs(20), 10.0, None);
        w.record(Duration::from_secs(25), 30.0, Some(4.0));
        assert_eq!(w.p95(Duration::from_secs(30)), (Some(900.0), Some(4.0)));
        // Thirty seconds on, the first one has left the window.
        assert_eq!(w.p95(Duration::from_secs(31)), (Some(30.0), Some(4.0)));
    }
}
