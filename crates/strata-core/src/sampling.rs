//! Per-request sampling settings, in the engine's terms.

/// How to pick each next token. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 turns top-k off.
    pub top_k: u32,
    /// `None`: a fresh random seed per request.
    pub seed: Option<u32>,
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: temperature 1, top_p 1.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}
