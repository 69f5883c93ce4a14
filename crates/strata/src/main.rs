//! The `strata` command: CLI wiring only; every part lives in a library
//! crate. `cli` says what the commands are; `main` hands each to the code
//! that runs it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use strata_core::config::Config;
use strata_models::fetch::{default_model_path, fetch, Fetched, ModelSource};

use crate::cli::{AuditCommand, Cli, Command, ConfigCommand, CostCommand, ModelCommand};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod chart;
mod cli;
mod cluster;
mod fleet;
mod launch;
mod otlp;
mod progress;
mod serve;
mod simulate;

fn main() -> Result<()> {
    let cli = Cli::parse();
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer as _;
        let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Traces keep their own level: quieter logs (`STRATA_LOG=warn`)
        // do not lose the request spans.
        let ratio = otlp::sampler_from_env()?;
        let otlp = otlp::endpoint_from_env()?.map(|url| {
            let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "strata".into());
            otlp::layer(url, &service, ratio)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
        });
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .with(otlp)
            .init();
    }
    match cli.command {
        Command::Config(ConfigCommand::Check { file, json }) => {
            check_config(file.as_deref().unwrap_or(&cli.config), json)
        }
        Command::Model(ModelCommand::Fetch {
            url: Some(url),
            sha256: Some(sha256),
            dest,
            json,
            ..
        }) => fetch_url(&url, &sha256, dest, json),
        Command::Model(ModelCommand::Fetch {
            model, dest, json, ..
        }) => fetch_model(&model, dest, json),
        Command::Model(ModelCommand::Check { path, sha256 }) => check_model(&path, &sha256),
        Command::Model(command) => runtime()?.block_on(admin::model(command)),
        // The engine's own threads (llama.cpp's) want the cores; its HTTP side
        // needs little, so it gets a single-threaded runtime.
        Command::Engine(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(serve::run_engine(load_config(&cli.config)?, args)),
        Command::Gateway(args) => {
            runtime()?.block_on(serve::run_gateway(load_config(&cli.config)?, args))
        }
        Command::Serve(args) => runtime()?.block_on(serve::run_serve(
            load_config(&cli.config)?,
            &cli.config,
            args,
        )),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "strata", &mut script);
            match std::io::stdout().write_all(&script) {
                // A reader that stopped early (`| head`) is not an error.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Command::K8s(command) => cluster::k8s(&load_config(&cli.config)?, &cli.config, command),
        Command::Controller(args) => runtime()?.block_on(cluster::run_controller(
            load_config(&cli.config)?,
            &cli.config,
            args,
        )),
        Command::Tenant(args) => runtime()?.block_on(admin::tenant(args)),
        Command::Key(args) => runtime()?.block_on(admin::key(args)),
        Command::Keys(args) => runtime()?.block_on(admin::keys(args)),
        Command::Audit(AuditCommand::Verify {
            db,
            checkpoints,
            json,
        }) => {
            let config = load_config(&cli.config)?;
            runtime()?.block_on(admin::verify_audit(
                &config,
                db.as_ref(),
                &checkpoints,
                json,
            ))
        }
        Command::Cost(CostCommand::Report {
            by,
            since,
            until,
            db,
            json,
            csv,
        }) => {
            let config = load_config(&cli.config)?;
            let Some(by) = strata_control::cost::GroupBy::parse(&by) else {
                bail!("--by must be tenant, model, pool, instance-type or class, not `{by}`");
            };
            let now = strata_core::now_ms();
            let moment = |flag: &str, text: &str| {
                strata_core::calendar::parse_moment(text, now).with_context(|| {
                    format!("--{flag} `{text}` is not a date, a UTC time or a span like 2h")
                })
            };
            let since = moment("since", &since)?;
            let until = until.map_or(Ok(now), |u| moment("until", &u))?;
            if until <= since {
                bail!("--until must be after --since");
            }
            let format = match (json, csv) {
                (true, _) => admin::Format::Json,
                (_, true) => admin::Format::Csv,
                _ => admin::Format::Table,
            };
            runtime()?.block_on(admin::cost_report(
                &config.store.database(db.as_ref()),
                by,
                since,
                until,
                format,
            ))
        }
        Command::Chaos(args) => runtime()?.block_on(admin::chaos(args)),
        Command::Simulate(args) => {
            runtime()?.block_on(simulate::run(load_config(&cli.config)?, args))
        }
        Command::Status { db, json } => {
            let config = load_config(&cli.config)?;
            runtime()?.block_on(admin::status(
                &config,
                &config.store.database(db.as_ref()),
                json,
            ))
        }
        Command::Decisions { db, limit, json } => {
            let config = load_config(&cli.config)?;
            runtime()?.block_on(admin::decisions(
                &config.store.database(db.as_ref()),
                limit,
                json,
            ))
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The config file if it exists (a missing default file means all defaults).
fn load_config(path: &Path) -> Result<Config> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new("strata.toml") => {
            return Ok(Config::default())
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("--config / STRATA_CONFIG: cannot read {}", path.display())
            })
        }
    };
    let config =
        Config::from_toml(&text).map_err(|i| anyhow::anyhow!("{}: {i}", path.display()))?;
    let issues = config.check();
    if !issues.is_empty() {
        let list: Vec<String> = issues.iter().map(|i| format!("  {i}")).collect();
        bail!("{} has problems:\n{}", path.display(), list.join("\n"));
    }
    Ok(config)
}

fn check_config(path: &Path, json: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let issues = match Config::from_toml(&text) {
        Ok(c) => c.check(),
        Err(issue) => vec![issue],
    };
    if json {
        let problems: Vec<_> = issues
            .iter()
            .map(|i| serde_json::json!({"key": i.key, "message": i.message}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"file": path, "ok": issues.is_empty(), "problems": problems})
        );
        if !issues.is_empty() {
            std::process::exit(1);
        }
        return Ok(());
    }
    if issues.is_empty() {
        println!("{}: ok", path.display());
        return Ok(());
    }
    for i in &issues {
        eprintln!("{}: {i}", path.display());
    }
    bail!("{} problem(s) in {}", issues.len(), path.display())
}

/// `strata model check PATH --sha256 H`: the file is the one named, or
/// the command fails saying what it hashes to.
fn check_model(path: &Path, sha256: &str) -> Result<()> {
    let actual = strata_models::fetch::sha256_file(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !actual.eq_ignore_ascii_case(sha256.trim()) {
        bail!(
            "{} has sha256 {actual}, not the {} --sha256 names",
            path.display(),
            sha256.trim()
        );
    }
    println!("{} (sha256 verified)", path.display());
    Ok(())
}

/// `strata model fetch --url URL --sha256 H [--dest FILE]`: into the cache
/// by hash (nothing partial is kept), then linked (or copied) to `dest` if given.
fn fetch_url(url: &str, sha256: &str, dest: Option<PathBuf>, json: bool) -> Result<()> {
    let mut bar = progress::Bar::new("strata model fetch");
    let fetched = runtime()?.block_on(strata_models::remote::fetch_url(url, sha256, &mut |p| {
        bar.set(p.done, p.stage)
    }));
    bar.finish(if fetched.is_ok() { "done" } else { "failed" });
    let (cached, outcome) = fetched.map_err(|e| anyhow::anyhow!("--url: {e}"))?;
    let path = match dest {
        Some(dest) if dest != cached => {
            // Whole or not at all: a link (on the cache's file system, no
            // second copy) or a copy beside it, renamed into place.
            let part = dest.with_extension("part");
            let _ = std::fs::remove_file(&part);
            std::fs::hard_link(&cached, &part)
                .or_else(|_| std::fs::copy(&cached, &part).map(|_| ()))
                .and_then(|_| std::fs::rename(&part, &dest))
                .with_context(|| format!("--dest {}", dest.display()))?;
            dest
        }
        _ => cached,
    };
    let fetched = outcome == Fetched::Downloaded;
    if json {
        println!(
            "{}",
            serde_json::json!({"path": path, "sha256": sha256.to_ascii_lowercase(), "verified": true, "fetched": fetched})
        );
    } else {
        let how = if fetched {
            "fetched"
        } else {
            "already present"
        };
        println!("{} ({how}, sha256 verified)", path.display());
    }
    Ok(())
}

fn fetch_model(model: &str, dest: Option<PathBuf>, json: bool) -> Result<()> {
    let Some(source) = ModelSource::named(model) else {
        bail!(
            "no built-in model {model:?}: {}",
            ModelSource::builtin_ids().join(" or ")
        );
    };
    let dest = dest.unwrap_or_else(|| default_model_path(&source.file_name));
    let mut bar = progress::Bar::new("strata model fetch");
    let outcome = fetch(&source, &dest, &mut |p| bar.set(p.done, p.stage));
    bar.finish(if outcome.is_ok() { "done" } else { "failed" });
    let outcome = outcome?;
    if json {
        let fetched = outcome == Fetched::Downloaded;
        println!(
            "{}",
            serde_json::json!({"path": dest, "sha256": source.sha256, "verified": true, "fetched": fetched})
        );
        return Ok(());
    }
    match outcome {
        Fetched::AlreadyPresent => {
            println!("{} (already present, sha256 verified)", dest.display())
        }
        Fetched::Downloaded => println!("{} (fetched, sha256 verified)", dest.display()),
    }
    Ok(())
}
