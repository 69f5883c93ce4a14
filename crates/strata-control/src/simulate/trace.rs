//! Request traces for the simulator: arrival time, prompt tokens, output
//! tokens. Read from the Azure LLM inference trace CSV (`TIMESTAMP,
//! ContextTokens,GeneratedTokens`), the Mooncake JSON lines (`timestamp`
//! ms, `input_length`, `output_length`), or a generic CSV with a header
//! `at_s,prompt_tokens,output_tokens` (users' own traces). Arrivals are
//! made relative to the first request.

use std::path::Path;
use std::time::Duration;

use crate::ControlError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRequest {
    pub at: Duration,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

fn bad(path: &Path, line: usize, what: &str) -> ControlError {
    ControlError::BadData(format!("{}:{line}: {what}", path.display()))
}

/// `2023-11-16 18:15:46.6805900` as seconds since 1970 (UTC).
fn azure_time(text: &str) -> Option<f64> {
    let (date, time) = text.trim().split_once(' ')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let days =
        strata_core::calendar::days_from_civil(y, u32::try_from(m).ok()?, u32::try_from(day).ok()?);
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// Reads a trace in any of the three formats (told apart by the header or
/// the first character).
pub fn load(path: &Path) -> Result<Vec<TraceRequest>, ControlError> {
    let text = std::fs::read_to_string(path).map_err(crate::io_at(path))?;
    parse(&text).map_err(|(line, what)| bad(path, line, &what))
}

/// As `load`, from text; errors carry the 1-based line.
pub fn parse(text: &str) -> Result<Vec<TraceRequest>, (usize, String)> {
    let mut rows: Vec<(f64, u32, u32)> = Vec::new();
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, first)) = lines.next() else {
        return Err((1, "the trace is empty".into()));
    };
    let number = |line: usize, v: Option<&str>, what: &str| -> Result<u32, (usize, String)> {
        v.and_then(|v| v.trim().parse::<u32>().ok())
            .ok_or((line + 1, format!("{what} is not a whole number")))
    };
    if first.trim_start().starts_with('{') {
        for (i, l) in std::iter::once((0, first)).chain(lines) {
            let v: serde_json::Value =
                serde_json::from_str(l).map_err(|e| (i + 1, e.to_string()))?;
            let field = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
            let (Some(ts), Some(p), Some(o)) = (
                field("timestamp"),
                field("input_length"),
                field("output_length"),
            ) else {
                return Err((i + 1, "needs timestamp, input_length, output_length".into()));
            };
            rows.push((ts / 1000.0, p.max(0.0) as u32, o.max(0.0) as u32));
        }
    } else {
        let header: Vec<String> = first.split(',').map(|h| h.trim().to_lowercase()).collect();
        let azure = header == ["timestamp", "contexttokens", "generatedtokens"];
        if !azure && header != ["at_s", "prompt_tokens", "output_tokens"] {
            return Err((
                1,
                "the header must be `at_s,prompt_tokens,output_tokens` (or the Azure trace's)"
                    .into(),
            ));
        }
        for (i, l) in lines {
            let mut f = l.split(',');
            let at = f.next().unwrap_or_default();
            let at = if azure {
                azure_time(at)
            } else {
                at.trim().parse::<f64>().ok().filter(|v| v.is_finite())
            }
            .ok_or((i + 1, format!("`{at}` is not a time")))?;
            let p = number(i, f.next(), "the prompt token count")?;
            let o = number(i, f.next(), "the output token count")?;
            rows.push((at, p, o));
        }
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let t0 = rows.first().map_or(0.0, |r| r.0);
    Ok(rows
        .into_iter()
        .map(|(at, p, o)| TraceRequest {
            at: Duration::from_secs_f64((at - t0).max(0.0)),
            prompt_tokens: p,
            output_tokens: o.max(1),
        })
        .collect())
}

/// Stretches time by `time_scale` (2: half the rate) and multiplies the
/// request rate by `rate` (each request is repeated `rate` times on
/// average, copies spread by a fixed pattern so runs are deterministic).
pub fn reshape(trace: &[TraceRequest], time_scale: f64, rate: f64) -> Vec<TraceRequest> {
    let mut out = Vec::new();
    let mut carry = 0.0;
    for (i, r) in trace.iter().enumerate() {
        let at = r.at.mul_f64(time_scale.max(0.0));
        carry += rate.max(0.0);
        let copies = carry.floor();
        carry -= copies;
        for c in 0..copies as u32 {
            // Copies land a little apart, so they do not arrive as one burst.
            let jitter = Duration::from_millis((i as u64 * 7919 + u64::from(c) * 104_729) % 997);
            out.push(TraceRequest {
                at: if c == 0 { at } else { at + jitter },
                ..*r
            });
        }
    }
    out.sort_by_key(|r| r.at);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_formats_read_alike() {
        let azure = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,374,44\n2023-11-16 18:15:48.0,396,109\n";
        let mooncake = "{\"timestamp\": 0, \"input_length\": 374, \"output_length\": 44}\n{\"timestamp\": 1500, \"input_length\": 396, \"output_length\": 109, \"hash_ids\": [1]}\n";
        let generic = "at_s,prompt_tokens,output_tokens\n10.0,374,44\n11.5,396,109\n";
        let want = vec![
            TraceRequest {
                at: Duration::ZERO,
                prompt_tokens: 374,
                output_tokens: 44,
            },
            TraceRequest {
                at: Duration::from_millis(1500),
                prompt_tokens: 396,
                output_tokens: 109,
            },
        ];
        for text in [azure, mooncake, generic] {
            assert_eq!(parse(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn bad_traces_name_their_line() {
        assert_eq!(parse("").unwrap_err().0, 1);
        assert_eq!(parse("a,b,c\n1,2,3\n").unwrap_err().0, 1);
        assert_eq!(
            parse("at_s,prompt_tokens,output_tokens\n1,2,3\nx,2,3\n")
                .unwrap_err()
                .0,
            3
        );
        assert_eq!(
            parse("at_s,prompt_tokens,output_tokens\n1,-2,3\n")
                .unwrap_err()
                .0,
            2
        );
        assert_eq!(parse("{\"timestamp\": 1}\n").unwrap_err().0, 1);
    }

    #[test]
    fn reshaping_scales_time_and_multiplies_the_rate_deterministically() {
        let t = parse("at_s,prompt_tokens,output_tokens\n0,1,1\n10,1,1\n20,1,1\n30,1,1\n").unwrap();
        let slow = reshape(&t, 2.0, 1.0);
        assert_eq!(slow.last().unwrap().at, Duration::from_secs(60));
        let more = reshape(&t, 1.0, 2.5);
        assert_eq!(more.len(), 10);
        assert_eq!(reshape(&t, 1.0, 2.5), more);
        assert_eq!(reshape(&t, 1.0, 0.5).len(), 2);
    }
}
