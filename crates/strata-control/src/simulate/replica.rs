//! A replica with continuous batching, on a virtual clock: up to
//! `max_sequences` requests run at once; each step of `dt` first prefills
//! the waiting prompts in arrival order at the profile's prefill rate (a
//! request's first token comes when its prompt is done), then spends the
//! rest of the step decoding, the profile's decode rate at the current batch
//! size shared equally by the decoding requests. TTFT and time per output
//! token come out of this queue, not out of a formula. Batch API lines
//! (`Running::batch`) are prefilled after every interactive prompt, as
//! strata's engine plans its steps, and their tokens are counted apart.

use std::time::Duration;

use strata_core::config::InstanceType;

#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    pub id: usize,
    pub arrived: Duration,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    prefilled: f64,
    /// Tokens generated, the first (from the prefill) included.
    generated: f64,
    pub first_token: Option<Duration>,
    /// A Batch API line: its prompt waits for interactive ones.
    pub batch: bool,
}

impl Running {
    pub fn new(id: usize, arrived: Duration, prompt_tokens: u32, output_tokens: u32) -> Self {
        Running {
            id,
            arrived,
            prompt_tokens,
            output_tokens: output_tokens.max(1),
            prefilled: 0.0,
            generated: 0.0,
            first_token: None,
            batch: false,
        }
    }

    /// The same, as a Batch API line.
    pub fn batch(self) -> Self {
        Running {
            batch: true,
            ..self
        }
    }

    /// Started over: what it had done is lost.
    pub fn restart(&self) -> Self {
        Running {
            batch: self.batch,
            ..Running::new(
                self.id,
                self.arrived,
                self.prompt_tokens,
                self.output_tokens,
            )
        }
    }

    /// Tokens still to process (prompt left plus output left).
    pub fn outstanding(&self) -> f64 {
        (f64::from(self.prompt_tokens) - self.prefilled).max(0.0)
            + (f64::from(self.output_tokens) - self.generated).max(0.0)
    }
}

/// A request that finished, with its timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub id: usize,
    pub arrived: Duration,
    pub first_token: Duration,
    pub done: Duration,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

impl Finished {
    pub fn ttft(&self) -> Duration {
        self.first_token.saturating_sub(self.arrived)
    }

    /// Time per output token after the first (zero for one-token answers).
    pub fn tpot(&self) -> Duration {
        match self.output_tokens {
            0 | 1 => Duration::ZERO,
            n => self.done.saturating_sub(self.first_token) / (n - 1),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplicaModel {
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: Vec<f64>,
    pub running: Vec<Running>,
    /// Tokens served so far, as they are produced: prompt tokens as they
    /// are prefilled, output tokens as they are decoded.
    pub served: Served,
    /// Of those, Batch API lines' tokens.
    pub served_batch: Served,
}

/// Running totals of tokens served by a replica.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Served {
    pub prompt: f64,
    pub output: f64,
}

impl ReplicaModel {
    pub fn new(profile: &InstanceType) -> Self {
        ReplicaModel {
            prefill_tokens_per_s: profile.prefill_tokens_per_s.max(f64::MIN_POSITIVE),
            decode_tokens_per_s: profile.decode_tokens_per_s.clone(),
            running: Vec::new(),
            served: Served::default(),
            served_batch: Served::default(),
        }
    }

    pub fn max_sequences(&self) -> usize {
        self.decode_tokens_per_s.len().max(1)
    }

    pub fn free_slots(&self) -> usize {
        self.max_sequences().saturating_sub(self.running.len())
    }

    pub fn outstanding(&self) -> f64 {
        self.running.iter().map(Running::outstanding).sum()
    }

    /// Batch API lines running here.
    pub fn batch_lines(&self) -> usize {
        self.running.iter().filter(|r| r.batch).count()
    }

    /// Takes out the batch line that has done least (the newest), to run
    /// again later from the start.
    pub fn preempt_batch(&mut self) -> Option<Running> {
        let i = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, r)| r.batch)
            .max_by(|(_, a), (_, b)| a.outstanding().total_cmp(&b.outstanding()))
            .map(|(i, _)| i)?;
        Some(self.running.remove(i).restart())
    }

    /// Counts tokens served for a request (a batch line's apart too).
    fn count(&mut self, batch: bool, prompt: f64, output: f64) {
        self.served.prompt += prompt;
        self.served.output += output;
        if batch {
            self.served_batch.prompt += prompt;
            self.served_batch.output += output;
        }
    }

    fn decode_rate(&self, batch: usize) -> f64 {
        let i = batch.clamp(1, self.decode_tokens_per_s.len().max(1)) - 1;
        self.decode_tokens_per_s.get(i).copied().unwrap_or(0.0)
    }

    /// Runs from `now` for `dt`; the requests that finished in it.
    pub fn step(&mut self, now: Duration, dt: Duration) -> Vec<Finished> {
        let mut budget = dt.as_secs_f64();
        let mut clock = now.as_secs_f64();
        // Prefill, oldest first, interactive prompts before batch lines'.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].batch);
        for i in order {
            if budget <= 0.0 {
                break;
            }
            let rate = self.prefill_tokens_per_s;
            let r = &mut self.running[i];
            let left = f64::from(r.prompt_tokens) - r.prefilled;
            if left <= 0.0 {
                continue;
            }
            let need = left / rate;
            let batch = r.batch;
            if need <= budget {
                budget -= need;
                clock += need;
                r.prefilled = f64::from(r.prompt_tokens);
                r.generated = 1.0;
                r.first_token = Some(Duration::from_secs_f64(clock));
                self.count(batch, left, 1.0);
            } else {
                r.prefilled += budget * rate;
                self.count(batch, budget * rate, 0.0);
                clock += budget;
                budget = 0.0;
            }
        }
        // Decode with what is left of the step.
        let mut done_at: Vec<Option<f64>> = vec![None; self.running.len()];
        for (i, r) in self.running.iter().enumerate() {
            if let Some(first) = r
                .first_token
                .filter(|_| r.generated >= f64::from(r.output_tokens))
            {
                done_at[i] = Some(first.as_secs_f64());
            }
        }
        let decoding = self
            .running
            .iter()
            .filter(|r| r.first_token.is_some() && r.generated < f64::from(r.output_tokens))
            .count();
        if budget > 0.0 && decoding > 0 {
            let per_request = self.decode_rate(decoding) / decoding as f64;
            for (i, done) in done_at.iter_mut().enumerate() {
                let r = &mut self.running[i];
                let left = f64::from(r.output_tokens) - r.generated;
                if r.first_token.is_none() || left <= 0.0 {
                    continue;
                }
                let need = left / per_request;
                let batch = r.batch;
                if need <= budget {
                    r.generated = f64::from(r.output_tokens);
                    self.count(batch, 0.0, left);
                    *done = Some(clock + need);
                } else {
                    r.generated += budget * per_request;
                    self.count(batch, 0.0, budget * per_request);
                }
            }
        }
        let mut finished = Vec::new();
        let mut i = 0;
        self.running.retain(|r| {
            let at = done_at[i];
            i += 1;
            if let (Some(at), Some(first)) = (at, r.first_token) {
                finished.push(Finished {
                    id: r.id,
                    arrived: r.arrived,
                    first_token: first,
                    done: Duration::from_secs_f64(at).max(first),
                    prompt_tokens: r.prompt_tokens,
                    output_tokens: r.output_tokens,
                });
                return false;
            }
            true
        });
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> InstanceType {
        // 1,000 prompt tokens/s; 10 tokens/s alone, 16 for two together.
        InstanceType {
            threads: 0,
            prefill_tokens_per_s: 1000.0,
            decode_tokens_per_s: vec![10.0, 16.0],
            launch_secs: None,
            gpus: 0,
        }
    }

    fn run_until_empty(m: &mut ReplicaModel, dt: Duration) -> Vec<Finished> {
        let mut out = Vec::new();
        let mut now = Duration::ZERO;
        while !m.running.is_empty() {
            out.extend(m.step(now, dt));
            now += dt;
        }
        out
    }

    #[test]
    fn one_request_prefills_then_decodes_at_the_batch_one_rate() {
        // 500 prompt tokens: first token at 0.5 s; 11 output tokens: 10 more at 10/s: done at 1.5 s.
        let mut m = ReplicaModel::new(&profile());
        m.running.push(Running::new(0, Duration::ZERO, 500, 11));
        let f = run_until_empty(&mut m, Duration::from_millis(100));
        assert_eq!(f.len(), 1);
        assert!((f[0].ttft().as_secs_f64() - 0.5).abs() < 1e-6, "{f:?}");
        assert!((f[0].done.as_secs_f64() - 1.5).abs() < 1e-6, "{f:?}");
        assert!((f[0].tpot().as_secs_f64() - 0.1).abs() < 1e-6);
    }

    #[test]
    fn two_requests_share_the_batch_rate_and_the_second_prefill_waits_for_the_first() {
        // Prefills: 0.2 s then 0.3 s (first tokens at 0.2 and 0.5 s). From
        // 0.5 s both decode at 8 tokens/s each.
        let mut m = ReplicaModel::new(&profile());
        m.running.push(Running::new(0, Duration::ZERO, 200, 9));
        m.running.push(Running::new(1, Duration::ZERO, 300, 9));
        let f = run_until_empty(&mut m, Duration::from_millis(50));
        let by_id = |id| f.iter().find(|x| x.id == id).unwrap();
        assert!((by_id(0).ttft().as_secs_f64() - 0.2).abs() < 1e-6);
        assert!((by_id(1).ttft().as_secs_f64() - 0.5).abs() < 1e-6);
        // Prefill goes first, so request 0 does not decode while request 1
        // prefills; from 0.5 s each has 8 tokens left at 8/s: both done at 1.5 s.
        for id in [0, 1] {
            assert!((by_id(id).done.as_secs_f64() - 1.5).abs() < 1e-6, "{f:?}");
            assert!(
                (by_id(id).tpot().as_secs_f64()
                    - (1.5 - by_id(id).first_token.as_secs_f64()) / 8.0)
                    .abs()
                    < 1e-9
            );
        }
        assert_eq!(m.free_slots(), 2);
    }

    #[test]
    fn a_batch_line_prefills_after_an_interactive_prompt_and_counts_apart() {
        // The batch line came first, but the interactive prompt (300
        // tokens) is read first: its first token at 0.3 s, the batch's at
        // 0.5 s.
        let mut m = ReplicaModel::new(&profile());
        m.running
            .push(Running::new(0, Duration::ZERO, 200, 5).batch());
        m.running.push(Running::new(1, Duration::ZERO, 300, 5));
        m.step(Duration::ZERO, Duration::from_millis(500));
        let first = |id| m.running.iter().find(|r| r.id == id).unwrap().first_token;
        assert_eq!(first(1), Some(Duration::from_millis(300)));
        assert_eq!(first(0), Some(Duration::from_millis(500)));
        assert_eq!(
            m.served_batch,
            Served {
                prompt: 200.0,
                output: 1.0
            }
        );
        assert_eq!(m.served.prompt, 500.0);
        // Preempted, the batch line starts over; the interactive one stays.
        assert_eq!(m.batch_lines(), 1);
        let again = m.preempt_batch().unwrap();
        assert!(again.batch && again.first_token.is_none());
        assert_eq!(again.outstanding(), 205.0);
        assert_eq!((m.batch_lines(), m.running.len()), (0, 1));
        assert!(m.preempt_batch().is_none());
    }

    #[test]
    fn tokens_count_as_served_while_the_request_runs() {
        // 500 prompt tokens at 1,000/s: 400 prefilled at 0.4 s; done at
        // 0.5 s with the first output token; then 10 tokens/s. At 1.0 s:
        // the prompt and 1 + 5 output tokens.
        let mut m = ReplicaModel::new(&profile());
        m.running.push(Running::new(0, Duration::ZERO, 500, 11));
        m.step(Duration::ZERO, Duration::from_millis(400));
        assert!((m.served.prompt - 400.0).abs() < 1e-9, "{:?}", m.served);
        assert_eq!(m.served.output, 0.0);
        m.step(Duration::from_millis(400), Duration::from_millis(600));
        assert!((m.served.prompt - 500.0).abs() < 1e-9, "{:?}", m.served);
        assert!((m.served.output - 6.0).abs() < 1e-9, "{:?}", m.served);
        run_until_empty(&mut m, Duration::from_millis(100));
        assert!((m.served.output - 11.0).abs() < 1e-9, "{:?}", m.served);
    }

    #[test]
    fn a_one_token_answer_is_done_with_its_prefill() {
        let mut m = ReplicaModel::new(&profile());
        m.running
            .push(Running::new(0, Duration::from_millis(100), 100, 1));
        let f = m.step(Duration::from_millis(100), Duration::from_millis(200));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].done, f[0].first_token);
        assert!((f[0].ttft().as_secs_f64() - 0.1).abs() < 1e-9);
    }
}
