//! Model files from a URL: HTTP(S), or an S3-compatible object store
//! (`s3://bucket/key`; region, credentials and endpoint from the usual
//! `AWS_*` environment, e.g. `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP` for a
//! store that is not AWS). The body streams into a part file in the cache,
//! hashed on the way; only a file whose sha256 is the one asked for is
//! renamed into place (`sha256-<hash>.gguf`), so nothing partial is ever
//! loaded, and a file is downloaded once per machine.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::fetch::{default_model_path, hex, Fetched, Progress};
use crate::{io_at, ModelError};

/// Where the file that hashes to `sha256` is cached.
pub fn cached_path(sha256: &str) -> PathBuf {
    default_model_path(&format!("sha256-{}.gguf", sha256.to_ascii_lowercase()))
}

/// Whether `url` is one `fetch_url` takes.
pub fn is_supported(url: &str) -> bool {
    ["http://", "https://", "s3://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
}

/// The file at `url`, which must hash to `sha256`: from the cache, or
/// downloaded into it. `progress` hears the share of bytes received (when
/// the size is known) every few percent.
pub async fn fetch_url(
    url: &str,
    sha256: &str,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<(PathBuf, Fetched), ModelError> {
    let dest = cached_path(sha256);
    if dest.is_file() {
        return Ok((dest, Fetched::AlreadyPresent));
    }
    let dir = dest.parent().expect("a cache file has a directory");
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    // A part file of this download's own, removed on any failure.
    let part = tempfile::Builder::new()
        .prefix(".download-")
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(io_at(dir))?;
    let (actual, bytes) = download(url, part.path(), progress).await?;
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(ModelError::HashMismatch {
            expected: sha256.to_ascii_lowercase(),
            actual,
        });
    }
    part.persist(&dest).map_err(|e| io_at(&dest)(e.error))?;
    progress(Progress {
        stage: &format!("downloaded {bytes} bytes, sha256 verified"),
        done: 1.0,
    });
    Ok((dest, Fetched::Downloaded))
}

/// Streams `url` into `out`; returns the body's sha256 (hex) and length.
async fn download(
    url: &str,
    out: &Path,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<(String, u64), ModelError> {
    let failed = |e: &dyn std::fmt::Display| ModelError::Fetch {
        url: url.to_owned(),
        reason: e.to_string(),
    };
    let (size, mut body): (
        Option<u64>,
        futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>>,
    ) = if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, key) = rest
            .split_once('/')
            .filter(|(b, k)| !b.is_empty() && !k.is_empty())
            .ok_or_else(|| failed(&"an S3 URL is s3://BUCKET/KEY"))?;
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| failed(&e))?;
        let got = object_store::ObjectStore::get(&store, &object_store::path::Path::from(key))
            .await
            .map_err(|e| failed(&e))?;
        let size = got.meta.size;
        (
            Some(size),
            got.into_stream()
                .map(|c| c.map_err(|e| e.to_string()))
                .boxed(),
        )
    } else {
        let client = http_client().map_err(|e| failed(&e))?;
        let resp = client.get(url).send().await.map_err(|e| failed(&e))?;
        if !resp.status().is_success() {
            return Err(failed(&format!("HTTP {}", resp.status())));
        }
        (
            resp.content_length(),
            resp.bytes_stream()
                .map(|c| c.map_err(|e| e.to_string()))
                .boxed(),
        )
    };
    let mut file = tokio::fs::File::create(out).await.map_err(io_at(out))?;
    let mut hasher = Sha256::new();
    let (mut got, mut told) = (0u64, 0.0);
    let stage = format!("downloading {url}");
    progress(Progress {
        stage: &stage,
        done: 0.0,
    });
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| failed(&e))?;
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io_at(out))?;
        got += chunk.len() as u64;
        if let Some(size) = size.filter(|s| *s > 0) {
            let done = got as f64 / size as f64;
            if done - told >= 0.05 {
                told = done;
                progress(Progress {
                    stage: &stage,
                    done,
                });
            }
        }
    }
    file.flush().await.map_err(io_at(out))?;
    file.sync_all().await.map_err(io_at(out))?;
    if size.is_some_and(|s| s != got) {
        return Err(failed(&format!(
            "the body ended after {got} of {} bytes",
            size.unwrap_or(0)
        )));
    }
    Ok((hex(&hasher.finalize()), got))
}

/// A client that trusts the system's certificate authorities.
fn http_client() -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder();
    for cert in rustls_native_certs::load_native_certs().certs {
        if let Ok(c) = reqwest::Certificate::from_der(&cert) {
            builder = builder.add_root_certificate(c);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_three_kinds_are_taken() {
        assert!(is_supported("https://example.org/m.gguf"));
        assert!(is_supported("http://127.0.0.1:9/m.gguf"));
        assert!(is_supported("s3://models/m.gguf"));
        assert!(!is_supported("ftp://x/m.gguf"));
        assert!(!is_supported("/models/m.gguf"));
        assert!(cached_path("ABC").ends_with("sha256-abc.gguf"));
    }
}
