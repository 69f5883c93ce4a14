//! The embedded engine: one scheduler thread owns the llama.cpp context and
//! runs continuous batching; callers tokenize on their own threads and get a
//! stream of events per request.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use strata_core::openai::{FinishReason, Generation, PromptInput, Usage};
use strata_core::sampling::SamplingParams;
use strata_core::{template, ApiError};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::batch::{fits, plan_step, BatchShare, PrefillPacer, SlotView, BATCH_TURN_EVERY};
use crate::error::EngineError;
use crate::metrics::EngineMetrics;
use crate::prefix::PrefixCache;
use crate::stop::StopMatcher;
use strata_core::snapshot::Snapshot;

/// How the engine is sized; see `strata_core::config::EngineConfig`.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub model_path: PathBuf,
    pub model_name: String,
    pub context_size: u32,
    pub max_sequences: u32,
    pub max_queue: u32,
    pub threads: u32,
    pub prefill_chunk: u32,
    /// The longest step while sequences decode (`PrefillPacer`); `None`:
    /// every step reads up to `prefill_chunk` prompt tokens.
    pub step_budget: Option<Duration>,
    /// Batch-class sequences that decode in a step beside interactive
    /// decoders (`BatchShare::beside`).
    pub batch_beside_interactive: u32,
    pub default_max_tokens: u32,
    pub prefix_cache_entries: u32,
}

/// What a running request produces, in order: text pieces, then one `Done`
/// (or one `Failed`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    Done { finish: FinishReason, usage: Usage },
    Failed(String),
}

/// A request accepted by the engine.
pub struct Submitted {
    pub events: UnboundedReceiver<Event>,
    pub prompt_tokens: u32,
}

/// Whose cache a request may use and extend: the scope (tenant salt;
/// prefix reuse happens only within one scope) and, for a stateful turn,
/// the session (conversation or response chain) its cells continue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheTag {
    pub scope: String,
    pub session: Option<String>,
}

/// Whether a request is interactive or batch work, which runs in what
/// interactive requests leave (`batch::plan_step`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Class {
    #[default]
    Interactive,
    Batch,
}

struct Job {
    tokens: Vec<LlamaToken>,
    tag: CacheTag,
    class: Class,
    max_tokens: u32,
    sampling: SamplingParams,
    events: UnboundedSender<Event>,
    arrived: Instant,
}

enum ChatTemplate {
    Gguf(LlamaChatTemplate),
    Gemma,
}

/// Work on the scheduler's cache besides requests; taken between steps even
/// while every sequence slot is busy, so a drain or a restore never waits
/// for a slot.
enum Control {
    /// Snapshots of every kept sequence that belongs to a session.
    Export(tokio::sync::oneshot::Sender<Vec<Snapshot>>),
    /// Loads a snapshot into a sequence and keeps it for reuse; answers the
    /// tokens restored.
    Import(
        Snapshot,
        tokio::sync::oneshot::Sender<Result<usize, String>>,
    ),
    /// Drops every kept sequence of a scope (a deleted tenant); answers the
    /// cells freed.
    Forget(String, tokio::sync::oneshot::Sender<usize>),
}

/// A loaded model and its scheduler. Dropping it stops the scheduler.
pub struct Engine {
    model: Arc<LlamaModel>,
    template: ChatTemplate,
    settings: EngineSettings,
    /// Names the model and context settings; snapshots carry it.
    fingerprint: String,
    jobs: SyncSender<Job>,
    control: std::sync::mpsc::Sender<Control>,
    queued: Arc<AtomicUsize>,
    pub metrics: Arc<EngineMetrics>,
    scheduler: Option<std::thread::JoinHandle<()>>,
    /// How many bytes llama.cpp's state of one sequence takes, measured at load.
    state_size: StateSize,
}

/// llama.cpp's saved state of one sequence: a fixed part and a part per
/// token, measured on this engine's own context at load (one and two
/// tokens). A snapshot's state larger than this for its tokens did not come
/// from an engine like this one and is refused before llama.cpp reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSize {
    pub fixed: usize,
    pub per_token: usize,
}

impl StateSize {
    /// The most bytes a state of `tokens` tokens may take: what was measured,
    /// plus an eighth and 4 KiB for what llama.cpp may add.
    pub fn bound(&self, tokens: usize) -> usize {
        let exact = self
            .fixed
            .saturating_add(self.per_token.saturating_mul(tokens));
        exact.saturating_add(exact / 8).saturating_add(4096)
    }
}

fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    let mut b = LlamaBackend::init().map_err(|e| EngineError::Backend(e.to_string()))?;
    if std::env::var_os("STRATA_LLAMA_LOG").is_none() {
        b.void_logs();
    }
    Ok(BACKEND.get_or_init(|| b))
}

impl Engine {
    /// Loads the model and starts the scheduler thread. Blocking.
    pub fn load(settings: EngineSettings) -> Result<Engine, EngineError> {
        let backend = backend()?;
        if !settings.model_path.is_file() {
            return Err(EngineError::ModelMissing(settings.model_path.clone()));
        }
        let model =
            LlamaModel::load_from_file(backend, &settings.model_path, &LlamaModelParams::default())
                .map_err(|e| EngineError::ModelLoad(settings.model_path.clone(), e.to_string()))?;
        let model = Arc::new(model);
        let template = match model.chat_template(None) {
            Ok(t) => ChatTemplate::Gguf(t),
            Err(_) => ChatTemplate::Gemma,
        };
        let fingerprint = format!(
            "{}|bytes={}|params={}|layers={}|embd={}|kv_heads={}|vocab={}|ctx={}|swa_full|f16",
            settings.model_name,
            model.size(),
            model.n_params(),
            model.n_layer(),
            model.n_embd(),
            model.n_head_kv(),
            model.n_vocab(),
            settings.context_size,
        );
        let metrics = Arc::new(EngineMetrics::new());
        let queued = Arc::new(AtomicUsize::new(0));
        let (jobs, rx) = std::sync::mpsc::sync_channel(settings.max_queue.max(1) as usize);
        let (control, control_rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let scheduler = {
            let (model, settings, metrics, queued) = (
                model.clone(),
                settings.clone(),
                metrics.clone(),
                queued.clone(),
            );
            std::thread::Builder::new()
                .name("strata-scheduler".into())
                .spawn(move || {
                    let channels = (rx, control_rx);
                    run_scheduler(
                        backend, &model, &settings, channels, &metrics, &queued, ready_tx,
                    )
                })
                .map_err(|e| EngineError::Backend(e.to_string()))?
        };
        let state_size = ready_rx
            .recv()
            .map_err(|_| EngineError::Backend("scheduler thread died".into()))??;
        Ok(Engine {
            model,
            template,
            settings,
            fingerprint,
            jobs,
            control,
            queued,
            metrics,
            scheduler: Some(scheduler),
            state_size,
        })
    }

    /// The size of one sequence's saved state, as measured at load.
    pub fn state_size(&self) -> StateSize {
        self.state_size
    }

    pub fn model_name(&self) -> &str {
        &self.settings.model_name
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Snapshots of the kept sequences that belong to sessions (what a
    /// draining replica hands over).
    pub async fn export(&self) -> Result<Vec<Snapshot>, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_control(Control::Export(tx))?;
        rx.await
            .map_err(|_| ApiError::unavailable("The engine has stopped."))
    }

    /// Restores a snapshot (already checked against this engine's
    /// fingerprint) into the prefix cache; answers the tokens restored.
    pub async fn import(&self, snapshot: Snapshot) -> Result<usize, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_control(Control::Import(snapshot, tx))?;
        rx.await
            .map_err(|_| ApiError::unavailable("The engine has stopped."))?
            .map_err(|e| ApiError::conflict(format!("The snapshot was not restored: {e}")))
    }

    /// Drops every kept sequence of `scope` (a deleted tenant's cells);
    /// answers the cells freed.
    pub async fn forget_scope(&self, scope: &str) -> Result<usize, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_control(Control::Forget(scope.to_owned(), tx))?;
        rx.await
            .map_err(|_| ApiError::unavailable("The engine has stopped."))
    }

    fn send_control(&self, work: Control) -> Result<(), ApiError> {
        self.control
            .send(work)
            .map_err(|_| ApiError::unavailable("The engine has stopped."))
    }

    /// The text the model reads for this input (chat template applied).
    pub fn render(&self, input: &PromptInput) -> Result<String, ApiError> {
        match input {
            PromptInput::Text(t) => Ok(t.clone()),
            PromptInput::Continue(turns) => match &self.template {
                ChatTemplate::Gemma => Ok(template::gemma_continue_segments(turns)
                    .into_iter()
                    .map(|s| match s {
                        template::Segment::Markup(t) | template::Segment::Text(t) => t,
                    })
                    .collect()),
                ChatTemplate::Gguf(t) => {
                    let (last, before) = turns.split_last().ok_or_else(|| {
                        ApiError::invalid_request(Some("messages"), "No message to continue.")
                    })?;
                    if last.text.trim().is_empty() {
                        // Nothing said yet: the answer starts as a new one.
                        return self.render_gguf(t, before, true);
                    }
                    let closed = self.render_gguf(t, turns, false)?;
                    template::reopen_final_turn(&closed, &last.text).ok_or_else(|| {
                        ApiError::invalid_request(
                            Some("continue_final_message"),
                            "This model's chat template changes the final message, so it cannot be continued as written.",
                        )
                    })
                }
            },
            PromptInput::Chat(turns) => match &self.template {
                ChatTemplate::Gemma => Ok(template::render_gemma(turns)),
                ChatTemplate::Gguf(t) => self.render_gguf(t, turns, true),
            },
        }
    }

    /// `turns` through the model's own chat template, with the assistant's
    /// turn opened after them when `open_answer`.
    fn render_gguf(
        &self,
        t: &LlamaChatTemplate,
        turns: &[strata_core::openai::Turn],
        open_answer: bool,
    ) -> Result<String, ApiError> {
        let messages = turns
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.as_str().into(), m.text.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                ApiError::invalid_request(
                    Some("messages"),
                    "Message text must not contain NUL characters.",
                )
            })?;
        self.model
            .apply_chat_template(t, &messages, open_answer)
            .map_err(|e| ApiError::internal(format!("chat template failed: {e}")))
    }

    /// Tokens of the input as the model sees them, BOS included.
    pub fn tokenize(&self, input: &PromptInput) -> Result<Vec<LlamaToken>, ApiError> {
        let vocab = self.model.vocab();
        let segments = match (input, &self.template) {
            (PromptInput::Chat(turns), ChatTemplate::Gemma) => {
                Some(template::gemma_segments(turns))
            }
            (PromptInput::Continue(turns), ChatTemplate::Gemma) => {
                Some(template::gemma_continue_segments(turns))
            }
            _ => None,
        };
        if let Some(segments) = segments {
            // Markup pieces may hold control tokens; message text never does,
            // so a message cannot close its turn and write the model's.
            // The model's own special prefix (BOS for Gemma), as `add_special` gives it.
            let mut tokens = vocab.tokenize(b"", true, false);
            for segment in segments {
                let (text, special) = match &segment {
                    template::Segment::Markup(t) => (t, true),
                    template::Segment::Text(t) => (t, false),
                };
                tokens.extend(vocab.tokenize(text.as_bytes(), false, special));
            }
            return Ok(tokens);
        }
        let text = self.render(input)?;
        // Chat templates produce control tokens; raw prompts are plain text.
        let parse_special = !matches!(input, PromptInput::Text(_));
        let bos_text = vocab
            .text(vocab.bos())
            .map(|c| c.to_string_lossy().into_owned());
        let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
        Ok(vocab.tokenize(text.as_bytes(), !has_bos, parse_special))
    }

    /// Validates the request against the context and enqueues it. Tokenizes
    /// on a blocking thread; a full queue is a 429. `tag` decides whose
    /// cached prefixes the request may reuse; `class`, whether it yields to
    /// interactive work.
    pub async fn submit(
        self: &Arc<Self>,
        generation: Generation,
        tag: CacheTag,
        class: Class,
    ) -> Result<Submitted, ApiError> {
        let this = self.clone();
        // The gateway reserved limits and budget for the same number.
        let cap = generation.max_output_tokens(self.settings.default_max_tokens);
        let input = generation.input;
        let tokens = tokio::task::spawn_blocking(move || this.tokenize(&input))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))??;
        let prompt_tokens = tokens.len() as u32;
        let ctx = self.settings.context_size;
        if prompt_tokens >= ctx {
            return Err(ApiError::context_length_exceeded(format!(
                "The prompt is {prompt_tokens} tokens; this model's context holds {ctx}."
            )));
        }
        // Without `max_tokens` the answer also stops where the context ends.
        let max_tokens = match generation.max_tokens {
            Some(_) => cap,
            None => cap.min(ctx - prompt_tokens),
        };
        if u64::from(prompt_tokens) + u64::from(max_tokens) > u64::from(ctx) {
            return Err(ApiError::context_length_exceeded(format!(
                "The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context of {ctx} tokens."
            )));
        }
        let (tx, rx) = unbounded_channel();
        let job = Job {
            tokens,
            tag,
            class,
            max_tokens,
            sampling: generation.sampling,
            events: tx,
            arrived: Instant::now(),
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.metrics.queued.inc();
        match self.jobs.try_send(job) {
            Ok(()) => Ok(Submitted {
                events: rx,
                prompt_tokens,
            }),
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                self.metrics.queued.dec();
                self.metrics.requests_rejected.inc();
                Err(match e {
                    TrySendError::Full(_) => {
                        ApiError::overloaded("The engine's queue is full; retry after a moment.")
                    }
                    TrySendError::Disconnected(_) => {
                        ApiError::unavailable("The engine has stopped.")
                    }
                })
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel ends the scheduler loop once running work is dropped.
        let (dead, _) = std::sync::mpsc::sync_channel(1);
        drop(std::mem::replace(&mut self.jobs, dead));
        if let Some(h) = self.scheduler.take() {
            let _ = h.join();
        }
    }
}

/// Resolves `threads = 0` to one share of the machine's cores.
pub fn default_threads(replicas: u32) -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    (cores / replicas.max(1)).max(1)
}

/// The model id for a GGUF path: its file name without `.gguf`.
pub fn model_name_for(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| "model".into())
}

// ---- the scheduler thread ---------------------------------------------------

struct Sequence {
    slot: i32,
    job: Job,
    /// Prompt tokens already in the KV cache.
    read: usize,
    /// Prompt tokens found in the prefix cache rather than prefilled.
    cached: usize,
    /// Generated tokens fed back to the model (their cells follow the prompt's).
    fed: Vec<LlamaToken>,
    /// Position of the next token fed to the model.
    pos: i32,
    /// Last sampled token, fed in the next decode step.
    last: Option<LlamaToken>,
    sampler: Option<LlamaSampler>,
    generated: u32,
    utf8: Vec<u8>,
    stop: StopMatcher,
    last_token_at: Option<Instant>,
    /// Index in this step's batch whose logits to sample.
    logits_at: Option<i32>,
}

impl Sequence {
    fn need(&self) -> usize {
        self.job.tokens.len() + self.job.max_tokens as usize
    }

    fn usage(&self) -> Usage {
        Usage::new(self.job.tokens.len() as u32, self.generated).with_cached(self.cached as u32)
    }
}

/// `None` for greedy decoding, which is an argmax over the logits.
fn sampler_for(p: &SamplingParams) -> Option<LlamaSampler> {
    if p.is_greedy() {
        return None;
    }
    let mut chain = Vec::new();
    if p.top_k > 0 {
        chain.push(LlamaSampler::top_k(p.top_k as i32));
    }
    if p.top_p < 1.0 {
        chain.push(LlamaSampler::top_p(p.top_p, 1));
    }
    chain.push(LlamaSampler::temp(p.temperature));
    chain.push(LlamaSampler::dist(p.seed.unwrap_or_else(rand_seed)));
    Some(LlamaSampler::chain_simple(chain))
}

fn rand_seed() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ (uuid::Uuid::new_v4().as_u128() as u32)
}

fn run_scheduler(
    backend: &LlamaBackend,
    model: &LlamaModel,
    settings: &EngineSettings,
    (jobs, control): (Receiver<Job>, Receiver<Control>),
    metrics: &EngineMetrics,
    queued: &AtomicUsize,
    ready: std::sync::mpsc::Sender<Result<StateSize, EngineError>>,
) {
    let n_batch = settings.prefill_chunk + settings.max_sequences;
    let threads = settings.threads.max(1) as i32;
    // Sequence ids for the running batch plus the prefix cache's entries.
    let n_seq = settings.max_sequences + settings.prefix_cache_entries;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(settings.context_size))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_seq_max(n_seq)
        // One cell pool for all sequences, so copying a prefix shares cells;
        // full-size sliding-window layers, so a kept sequence can be cut back
        // to any position.
        .with_kv_unified(true)
        .with_swa_full(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = match model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Context(e.to_string())));
            return;
        }
    };
    metrics.kv_total.set(i64::from(settings.context_size));
    let mut batch = LlamaBatch::new(n_batch as usize, settings.max_sequences as i32);
    let state_size = match measure_state(&mut ctx, &mut batch) {
        Ok(size) => {
            let _ = ready.send(Ok(size));
            size
        }
        Err(e) => {
            let _ = ready.send(Err(EngineError::Context(e)));
            return;
        }
    };
    let mut scheduler = Scheduler {
        model,
        settings,
        metrics,
        queued,
        batch,
        state_size,
        running: Vec::new(),
        waiting: None,
        free_slots: (0..n_seq as i32).rev().collect(),
        reserved: 0,
        cache: PrefixCache::new(settings.prefix_cache_entries as usize),
        pacer: settings
            .step_budget
            .map(|b| PrefillPacer::new(b.as_secs_f64(), settings.prefill_chunk as usize)),
        steps: 0,
        batch_held: 0,
    };
    loop {
        while let Ok(work) = control.try_recv() {
            scheduler.control(&mut ctx, work);
        }
        if !scheduler.admit(&mut ctx, &jobs) {
            return;
        }
        scheduler.step(&mut ctx);
    }
}

/// Decodes one token, then two, into sequence 0 and reads the size of its
/// saved state each time; leaves the context empty.
fn measure_state(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'static>,
) -> Result<StateSize, String> {
    let token = LlamaToken(0);
    let mut sizes = [0usize; 2];
    for (n, size) in sizes.iter_mut().enumerate() {
        batch.clear();
        for pos in 0..=n {
            batch
                .add(token, pos as i32, &[0], pos == n)
                .map_err(|e| e.to_string())?;
        }
        ctx.decode(batch).map_err(|e| e.to_string())?;
        *size = ctx.state_seq_get_size_ext(0, LlamaStateSeqFlags::empty());
        let _ = ctx.clear_kv_cache_seq(Some(0), None, None);
    }
    batch.clear();
    let per_token = sizes[1].saturating_sub(sizes[0]);
    if per_token == 0 {
        return Err(format!(
            "llama.cpp's sequence state did not grow with a token ({} bytes)",
            sizes[0]
        ));
    }
    Ok(StateSize {
        fixed: sizes[0] - per_token,
        per_token,
    })
}

struct Scheduler<'m> {
    model: &'m LlamaModel,
    settings: &'m EngineSettings,
    metrics: &'m EngineMetrics,
    queued: &'m AtomicUsize,
    batch: LlamaBatch<'static>,
    state_size: StateSize,
    running: Vec<Sequence>,
    /// A job taken from the queue that does not fit in the KV cache yet.
    waiting: Option<Job>,
    free_slots: Vec<i32>,
    /// KV cells reserved by running sequences (prompt + max_tokens each).
    reserved: usize,
    /// Finished sequences kept for prefix reuse; their cells count against
    /// the context next to `reserved` and are evicted to make room.
    cache: PrefixCache<LlamaToken>,
    /// Sizes each step's prefill to the step budget, where there is one.
    pacer: Option<PrefillPacer>,
    /// Steps taken (turns batch decoders beside interactive ones).
    steps: usize,
    /// Steps in a row that left batch work waiting for interactive work.
    batch_held: u64,
}

impl Scheduler<'_> {
    /// Moves queued jobs into free slots. Blocks when nothing runs. Returns
    /// false when the engine is shutting down and nothing is left to do.
    fn admit(&mut self, ctx: &mut LlamaContext<'_>, jobs: &Receiver<Job>) -> bool {
        let capacity = self.settings.context_size as usize;
        loop {
            if self.running.len() >= self.settings.max_sequences as usize {
                return true;
            }
            let job = match self.waiting.take() {
                Some(j) => j,
                // Idle: wait for a request, but come back soon for control work.
                None if self.running.is_empty() => {
                    match jobs.recv_timeout(Duration::from_millis(50)) {
                        Ok(j) => j,
                        Err(RecvTimeoutError::Timeout) => return true,
                        Err(RecvTimeoutError::Disconnected) => return false,
                    }
                }
                None => match jobs.try_recv() {
                    Ok(j) => j,
                    Err(_) => return true,
                },
            };
            if job.events.is_closed() {
                self.dequeued();
                continue;
            }
            let need = job.tokens.len() + job.max_tokens as usize;
            if !fits(self.reserved, need, capacity) {
                self.waiting = Some(job);
                return true;
            }
            self.dequeued();
            let (slot, cached) = self.place(ctx, &job, need);
            self.reserved += need;
            let stop = StopMatcher::new(job.sampling.stop.clone());
            self.running.push(Sequence {
                slot,
                sampler: sampler_for(&job.sampling),
                job,
                read: cached,
                cached,
                fed: Vec::new(),
                pos: cached as i32,
                last: None,
                generated: 0,
                utf8: Vec::new(),
                stop,
                last_token_at: None,
                logits_at: None,
            });
            self.metrics.running.set(self.running.len() as i64);
        }
    }

    /// The sequence id for `job` and how many of its prompt tokens are
    /// already in that sequence's cells: the cache entry it continues (taken
    /// over), a copy of a prefix it shares with an entry, or a fresh id.
    /// Evicts entries until the job's `need` fits beside them.
    fn place(&mut self, ctx: &mut LlamaContext<'_>, job: &Job, need: usize) -> (i32, usize) {
        let capacity = self.settings.context_size as usize;
        let mut hit = self.cache.lookup(&job.tag.scope, &job.tokens);
        loop {
            // An entry taken over stops counting as cached: `need` covers it.
            let moved = hit.filter(|h| h.whole).map_or(0, |h| h.len);
            if fits(self.reserved + self.cache.cells() - moved, need, capacity) {
                break;
            }
            if let Some(seq) = self.cache.evict_lru(hit.map(|h| h.seq)) {
                self.release(ctx, seq);
            } else if let Some(h) = hit.take() {
                self.cache.take(h.seq);
                self.release(ctx, h.seq);
            } else {
                break;
            }
        }
        let placed = match hit {
            Some(h) if h.whole => {
                self.cache.take(h.seq);
                // Cut the entry back to the shared prefix.
                match ctx.clear_kv_cache_seq(Some(h.seq as u32), Some(h.common as u32), None) {
                    Ok(true) => (h.seq, h.common),
                    _ => {
                        let _ = ctx.clear_kv_cache_seq(Some(h.seq as u32), None, None);
                        (h.seq, 0)
                    }
                }
            }
            Some(h) => {
                let slot = self
                    .free_slots
                    .pop()
                    .expect("ids for every running and cached sequence");
                self.cache.touch(h.seq);
                match ctx.copy_kv_cache_seq(h.seq, slot, Some(0), Some(h.common as u32)) {
                    Ok(()) => (slot, h.common),
                    Err(_) => (slot, 0),
                }
            }
            None => {
                let slot = self
                    .free_slots
                    .pop()
                    .expect("ids for every running and cached sequence");
                (slot, 0)
            }
        };
        if placed.1 > 0 {
            self.metrics.prefix_hits.inc();
            self.metrics.prefix_reused_tokens.inc_by(placed.1 as u64);
        }
        self.cache_gauges();
        placed
    }

    fn control(&mut self, ctx: &mut LlamaContext<'_>, work: Control) {
        match work {
            Control::Export(reply) => {
                let _ = reply.send(self.export(ctx));
            }
            Control::Import(snapshot, reply) => {
                let _ = reply.send(self.import(ctx, snapshot));
            }
            Control::Forget(scope, reply) => {
                let (seqs, cells) = self.cache.forget_scope(&scope);
                for seq in seqs {
                    self.release(ctx, seq);
                }
                self.cache_gauges();
                let _ = reply.send(cells);
            }
        }
    }

    fn export(&self, ctx: &LlamaContext<'_>) -> Vec<Snapshot> {
        self.cache
            .sessions()
            .into_iter()
            .filter_map(|e| {
                let flags = LlamaStateSeqFlags::empty();
                let size = ctx.state_seq_get_size_ext(e.seq, flags);
                let mut state = vec![0u8; size];
                // SAFETY: `state` holds the `size` bytes llama.cpp just asked for.
                let written =
                    unsafe { ctx.state_seq_get_data_ext(state.as_mut_ptr(), e.seq, flags) };
                (written == size && size > 0).then(|| Snapshot {
                    scope: e.scope,
                    session: e.session,
                    tokens: e.tokens.iter().map(|t| t.0).collect(),
                    state,
                })
            })
            .collect()
    }

    /// Loads `snapshot` into a free sequence (evicting kept sequences for
    /// room) and keeps it under its scope and session.
    fn import(&mut self, ctx: &mut LlamaContext<'_>, snapshot: Snapshot) -> Result<usize, String> {
        let need = snapshot.tokens.len();
        if snapshot.state.len() > self.state_size.bound(need) {
            return Err(format!(
                "{} bytes of state for {need} tokens; at most {} fit",
                snapshot.state.len(),
                self.state_size.bound(need)
            ));
        }
        let capacity = self.settings.context_size as usize;
        if !fits(self.reserved, need, capacity) {
            return Err("no room next to the running requests".into());
        }
        while !fits(self.reserved + self.cache.cells(), need, capacity)
            || self.free_slots.is_empty()
        {
            match self.cache.evict_lru(None) {
                Some(seq) => self.release(ctx, seq),
                None => return Err("no free sequence".into()),
            }
        }
        let seq = self.free_slots.pop().expect("checked above");
        // SAFETY: the bytes were written by `export` on an engine with this
        // fingerprint (checked by the caller) and arrived sealed.
        let loaded = unsafe {
            ctx.state_seq_set_data_ext(&snapshot.state, seq, LlamaStateSeqFlags::empty())
        };
        let restored = usize::try_from(ctx.kv_cache_seq_pos_max(seq) + 1).unwrap_or(0);
        if !loaded || restored != need {
            self.release(ctx, seq);
            return Err(format!("llama.cpp restored {restored} of {need} cells"));
        }
        let tokens = snapshot.tokens.into_iter().map(LlamaToken).collect();
        for freed in self
            .cache
            .insert(seq, &snapshot.scope, Some(&snapshot.session), tokens)
        {
            self.release(ctx, freed);
        }
        self.cache_gauges();
        Ok(need)
    }

    /// Clears sequence `seq`'s cells and makes its id free.
    fn release(&mut self, ctx: &mut LlamaContext<'_>, seq: i32) {
        let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        self.free_slots.push(seq);
    }

    fn cache_gauges(&self) {
        self.metrics
            .prefix_cache_tokens
            .set(self.cache.cells() as i64);
        self.metrics
            .prefix_cache_entries
            .set(self.cache.len() as i64);
    }

    fn dequeued(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queued.dec();
    }

    /// One llama_decode over every running sequence, then sampling.
    fn step(&mut self, ctx: &mut LlamaContext<'_>) {
        // Requests whose client went away free their sequence before any work.
        let gone: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].job.events.is_closed())
            .collect();
        for i in gone.into_iter().rev() {
            self.retire(ctx, i, None);
        }
        let views: Vec<SlotView> = self
            .running
            .iter()
            .map(|s| SlotView {
                unread_prompt: s.job.tokens.len() - s.read,
                batch: s.job.class == Class::Batch,
            })
            .collect();
        let decoders = views.iter().filter(|v| v.unread_prompt == 0).count();
        let budget = match &self.pacer {
            Some(pacer) => pacer.budget(decoders),
            None => self.settings.prefill_chunk as usize,
        };
        let share = BatchShare {
            beside: self.settings.batch_beside_interactive as usize,
            reserved_turn: self.batch_held + 1 >= BATCH_TURN_EVERY,
            rotation: self.steps,
        };
        let plan = plan_step(&views, budget, share);
        if plan.is_empty() {
            return;
        }
        self.steps = self.steps.wrapping_add(1);
        let held = views.iter().enumerate().any(|(i, v)| {
            v.batch && !plan.decode.contains(&i) && !plan.prefill.iter().any(|p| p.0 == i)
        });
        if held && !share.reserved_turn {
            self.batch_held += 1;
            self.metrics.batch_held_steps.inc();
        } else {
            self.batch_held = 0;
        }
        let started = Instant::now();
        let prefilled: usize = plan.prefill.iter().map(|p| p.1).sum();
        self.batch.clear();
        for s in &mut self.running {
            s.logits_at = None;
        }
        let mut n = 0i32;
        for &i in &plan.decode {
            let s = &mut self.running[i];
            let token = s.last.expect("a decoding sequence has sampled a token");
            self.batch
                .add(token, s.pos, &[s.slot], true)
                .expect("batch sized for max_sequences + prefill_chunk");
            s.logits_at = Some(n);
            s.fed.push(token);
            s.pos += 1;
            n += 1;
        }
        for &(i, count) in &plan.prefill {
            let s = &mut self.running[i];
            let end = s.read + count;
            for k in s.read..end {
                let last_of_prompt = k + 1 == s.job.tokens.len();
                self.batch
                    .add(s.job.tokens[k], s.pos, &[s.slot], last_of_prompt)
                    .expect("batch sized for max_sequences + prefill_chunk");
                if last_of_prompt {
                    s.logits_at = Some(n);
                }
                s.pos += 1;
                n += 1;
            }
            s.read = end;
            self.metrics.prompt_tokens.inc_by(count as u64);
        }
        self.metrics.step_tokens.inc_by(f64::from(n));
        if let Err(e) = ctx.decode(&mut self.batch) {
            tracing::error!(error = %e, "llama_decode failed; failing the batch");
            for i in (0..self.running.len()).rev() {
                if self.running[i].logits_at.is_some() || self.running[i].read > 0 {
                    self.retire(ctx, i, Some(Err(format!("decode failed: {e}"))));
                }
            }
            return;
        }
        let mut finished = Vec::new();
        for i in 0..self.running.len() {
            if let Some(at) = self.running[i].logits_at {
                if let Some(outcome) = self.sample(ctx, i, at) {
                    finished.push((i, outcome));
                }
            }
        }
        // What the decoders waited for: the forward pass and sampling.
        if let Some(pacer) = &mut self.pacer {
            pacer.observe(
                plan.decode.len(),
                prefilled,
                started.elapsed().as_secs_f64(),
            );
        }
        for (i, outcome) in finished.into_iter().rev() {
            self.retire(ctx, i, Some(Ok(outcome)));
        }
        let used: i64 = self.running.iter().map(|s| i64::from(s.pos)).sum();
        self.metrics.kv_used.set(used + self.cache.cells() as i64);
    }

    /// Samples sequence `i`'s next token; `Some` when the sequence is done.
    fn sample(&mut self, ctx: &LlamaContext<'_>, i: usize, at: i32) -> Option<FinishReason> {
        let model = self.model;
        let metrics = self.metrics;
        let s = &mut self.running[i];
        let token = match &mut s.sampler {
            Some(sampler) => sampler.sample(ctx, at),
            // Argmax straight over the logits: llama.cpp's greedy sampler first
            // copies all 262k candidates, a cost paid per sequence per step.
            None => argmax(ctx.get_logits_ith(at)),
        };
        let now = Instant::now();
        match s.last_token_at {
            None => metrics.ttft.observe((now - s.job.arrived).as_secs_f64()),
            Some(prev) => metrics.tpot.observe((now - prev).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        if model.vocab().is_eog(token) {
            return Some(FinishReason::Stop);
        }
        s.generated += 1;
        metrics.generated_tokens.inc();
        if s.job.class == Class::Batch {
            metrics.batch_generated_tokens.inc();
        }
        s.utf8
            .extend(model.vocab().token_to_piece(token, false, None));
        let text = take_utf8(&mut s.utf8);
        if !text.is_empty() {
            let m = s.stop.push(&text);
            if !m.emit.is_empty() {
                let _ = s.job.events.send(Event::Text(m.emit));
            }
            if m.stopped {
                return Some(FinishReason::Stop);
            }
        }
        if s.generated >= s.job.max_tokens {
            return Some(FinishReason::Length);
        }
        s.last = Some(token);
        None
    }

    /// Ends sequence `i` and tells its client how it ended. Its cells go to
    /// the prefix cache (unless decoding failed, which leaves them unsure).
    fn retire(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        i: usize,
        outcome: Option<Result<FinishReason, String>>,
    ) {
        let mut s = self.running.swap_remove(i);
        self.reserved -= s.need();
        if matches!(outcome, Some(Err(_))) {
            self.release(ctx, s.slot);
        } else {
            let mut tokens = s.job.tokens[..s.read].to_vec();
            tokens.extend_from_slice(&s.fed);
            debug_assert_eq!(tokens.len(), s.pos as usize);
            let tag = &s.job.tag;
            for seq in self
                .cache
                .insert(s.slot, &tag.scope, tag.session.as_deref(), tokens)
            {
                self.release(ctx, seq);
            }
            self.cache_gauges();
        }
        self.metrics.running.set(self.running.len() as i64);
        match outcome {
            None => {}
            Some(Ok(finish)) => {
                // Text held back as a possible stop-string start is real output
                // (after a stop-string hit the matcher holds nothing).
                let mut rest = s.stop.finish();
                if finish == FinishReason::Length {
                    rest.push_str(&String::from_utf8_lossy(&s.utf8));
                }
                if !rest.is_empty() {
                    let _ = s.job.events.send(Event::Text(rest));
                }
                let _ = s.job.events.send(Event::Done {
                    finish,
                    usage: s.usage(),
                });
            }
            Some(Err(message)) => {
                let _ = s.job.events.send(Event::Failed(message));
            }
        }
    }
}

/// The token with the highest logit (the first on ties, as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> LlamaToken {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    LlamaToken(best as i32)
}

/// Takes the longest complete UTF-8 prefix; a broken sequence becomes U+FFFD.
fn take_utf8(buf: &mut Vec<u8>) -> String {
    match std::str::from_utf8(buf) {
        Ok(s) => {
            let s = s.to_string();
            buf.clear();
            s
        }
        Err(e) => match e.error_len() {
            // Incomplete at the end: keep the tail for the next token.
            None => {
                let valid = e.valid_up_to();
                let s = String::from_utf8_lossy(&buf[..valid]).into_owned();
                buf.drain(..valid);
                s
            }
            Some(bad) => {
                let end = e.valid_up_to() + bad;
                let s = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end);
                s + &take_utf8(buf)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_highest() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), LlamaToken(1));
        assert_eq!(argmax(&[-5.0]), LlamaToken(0));
    }

    #[test]
    fn utf8_split_across_tokens_is_held_until_complete() {
        let mut buf = "caf".as_bytes().to_vec();
        buf.push(0xC3);
        assert_eq!(take_utf8(&mut buf), "caf");
        buf.push(0xA9);
        assert_eq!(take_utf8(&mut buf), "é");
        assert!(buf.is_empty());
        let mut bad = vec![b'a', 0xFF, b'b'];
        assert_eq!(take_utf8(&mut bad), "a\u{FFFD}b");
    }
}
