//! Admin verbs: thin clients of the gateway's `/admin/v1/` API (so roles and
//! the audit trail apply to them too), and the offline audit check.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use strata_core::tenant::{verify_audit as verify_chain, verify_checkpoints};
use strata_store::SqlStore;

use crate::cli::{
    AdminArgs, ChaosCommand, KeyCommand, KeysCommand, LimitFlags, ModelCommand, TenantCommand,
};

struct Api {
    client: reqwest::Client,
    url: String,
    key: String,
}

impl Api {
    fn new<C: clap::Subcommand>(args: &AdminArgs<C>) -> Result<Api> {
        Api::at(&args.url, args.api_key.as_deref())
    }

    fn at(url: &str, key: Option<&str>) -> Result<Api> {
        let Some(key) = key else {
            bail!("no admin key: pass --api-key or set STRATA_API_KEY");
        };
        Ok(Api {
            client: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
            key: key.to_owned(),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", self.url))?;
        let status = resp.status();
        let v: Value = resp
            .json()
            .await
            .context("the gateway's answer is not JSON")?;
        if !status.is_success() {
            bail!(
                "{status}: {}",
                v["error"]["message"].as_str().unwrap_or("no message")
            );
        }
        Ok(v)
    }
}

fn limits_json(l: &LimitFlags) -> Value {
    let mut v = json!({});
    if let Some(r) = l.rpm {
        v["requests_per_minute"] = json!(r);
    }
    if let Some(t) = l.tpm {
        v["tokens_per_minute"] = json!(t);
    }
    if let Some(t) = l.batch_tpm {
        v["batch_tokens_per_minute"] = json!(t);
    }
    if let Some(p) = &l.priority {
        v["priority"] = json!(p);
    }
    v
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Rows of `columns` from each object, aligned.
fn table(rows: &[Value], columns: &[&str]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(columns.iter().map(|c| c.to_uppercase()).collect())];
    out.extend(cells.into_iter().map(line));
    out.join("\n")
}

const TENANT_COLUMNS: &[&str] = &[
    "id",
    "name",
    "isolation",
    "requests_per_minute",
    "tokens_per_minute",
    "monthly_budget_usd",
    "priority",
];
const KEY_COLUMNS: &[&str] = &[
    "id",
    "name",
    "role",
    "models",
    "priority",
    "expires_at",
    "revoked_at",
];

fn print(json_out: bool, v: &Value, columns: &[&str]) {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(v).expect("JSON serialises")
        );
    } else if let Some(rows) = v["data"].as_array() {
        println!("{}", table(rows, columns));
    } else {
        println!("{}", table(std::slice::from_ref(v), columns));
    }
}

pub async fn tenant(args: AdminArgs<TenantCommand>) -> Result<()> {
    use reqwest::Method;
    let api = Api::new(&args)?;
    let v = match &args.command {
        TenantCommand::Create {
            name,
            isolation,
            limits,
            budget,
        } => {
            let mut body = merge(
                json!({"name": name, "isolation": isolation}),
                limits_json(limits),
            );
            if let Some(b) = budget {
                body["monthly_budget_usd"] = json!(b);
            }
            api.call(Method::POST, "/admin/v1/tenants", Some(body))
                .await?
        }
        TenantCommand::List => api.call(Method::GET, "/admin/v1/tenants", None).await?,
        TenantCommand::Show { id } => {
            api.call(Method::GET, &format!("/admin/v1/tenants/{id}"), None)
                .await?
        }
        TenantCommand::Update {
            id,
            limits,
            budget,
            clear_budget,
            clear_limits,
        } => {
            let mut body = if *clear_limits {
                json!({"requests_per_minute": null, "tokens_per_minute": null, "batch_tokens_per_minute": null})
            } else {
                json!({})
            };
            body = merge(body, limits_json(limits));
            if *clear_budget {
                body["monthly_budget_usd"] = Value::Null;
            } else if let Some(b) = budget {
                body["monthly_budget_usd"] = json!(b);
            }
            api.call(
                Method::PATCH,
                &format!("/admin/v1/tenants/{id}"),
                Some(body),
            )
            .await?
        }
        TenantCommand::Delete { id } => {
            let v = api
                .call(Method::DELETE, &format!("/admin/v1/tenants/{id}"), None)
                .await?;
            if !args.json {
                println!("deleted {id}");
                return Ok(());
            }
            v
        }
    };
    print(args.json, &v, TENANT_COLUMNS);
    Ok(())
}

pub async fn key(args: AdminArgs<KeyCommand>) -> Result<()> {
    use reqwest::Method;
    let api = Api::new(&args)?;
    match &args.command {
        KeyCommand::Create {
            tenant,
            role,
            name,
            models,
            limits,
            expires_in_days,
        } => {
            let mut body = merge(json!({"name": name, "role": role}), limits_json(limits));
            if let Some(m) = models {
                body["models"] = json!(m);
            }
            if let Some(days) = expires_in_days {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                body["expires_at"] = json!((now + days * 86_400.0) as i64);
            }
            let v = api
                .call(
                    Method::POST,
                    &format!("/admin/v1/tenants/{tenant}/keys"),
                    Some(body),
                )
                .await?;
            if args.json {
                print(true, &v, KEY_COLUMNS);
            } else {
                println!("{}", table(std::slice::from_ref(&v), KEY_COLUMNS));
                println!("\nkey (shown once): {}", cell(&v["key"]));
            }
        }
        KeyCommand::List { tenant } => {
            let v = api
                .call(
                    Method::GET,
                    &format!("/admin/v1/tenants/{tenant}/keys"),
                    None,
                )
                .await?;
            print(args.json, &v, KEY_COLUMNS);
        }
        KeyCommand::Revoke { tenant, id } => {
            let v = api
                .call(
                    Method::DELETE,
                    &format!("/admin/v1/tenants/{tenant}/keys/{id}"),
                    None,
                )
                .await?;
            print(args.json, &v, KEY_COLUMNS);
        }
    }
    Ok(())
}

pub async fn keys(args: AdminArgs<KeysCommand>) -> Result<()> {
    let api = Api::new(&args)?;
    match args.command {
        KeysCommand::RotateKek => {
            let v = api
                .call(reqwest::Method::POST, "/admin/v1/kek/rotate", None)
                .await?;
            if args.json {
                println!("{v}");
            } else {
                println!(
                    "KEK rotated: {} -> {}",
                    cell(&v["previous_id"]),
                    cell(&v["id"])
                );
            }
        }
    }
    Ok(())
}

pub async fn chaos(args: AdminArgs<ChaosCommand>) -> Result<()> {
    let api = Api::new(&args)?;
    match &args.command {
        ChaosCommand::Preempt {
            replica,
            notice_secs,
        } => {
            let body = notice_secs.map(|s| json!({ "notice_secs": s }));
            let v = api
                .call(
                    reqwest::Method::POST,
                    &format!("/admin/v1/replicas/{replica}/preempt"),
                    body,
                )
                .await?;
            if args.json {
                println!("{v}");
            } else {
                println!("{replica}: preemption notice sent; a replacement is being planned");
            }
        }
    }
    Ok(())
}

const MODEL_COLUMNS: &[&str] = &["id", "managed_by", "serving", "replicas", "replicas_ready"];

/// `strata model deploy|list|undeploy`.
pub async fn model(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Deploy {
            id,
            source,
            path,
            download,
            sha256,
            replicas,
            sets,
            api,
        } => {
            let mut entry = json!({ "id": id });
            let fields = [
                ("source", source.map(Value::from)),
                ("path", path.map(|p| Value::from(p.display().to_string()))),
                ("url", download.map(Value::from)),
                ("sha256", sha256.map(Value::from)),
                ("replicas", replicas.map(Value::from)),
            ];
            for (k, v) in fields {
                if let Some(v) = v {
                    entry[k] = v;
                }
            }
            for set in &sets {
                let (section, key, value) = parse_set(set)?;
                entry[section][key] = value;
            }
            let v = Api::at(&api.url, api.api_key.as_deref())?
                .call(reqwest::Method::POST, "/admin/v1/models", Some(entry))
                .await?;
            print(api.json, &v, MODEL_COLUMNS);
        }
        ModelCommand::Alias { id, weights, api } => {
            let mut alias = serde_json::Map::new();
            for w in &weights {
                let parsed = w
                    .split_once('=')
                    .and_then(|(m, w)| Some((m, w.trim().parse::<u32>().ok()?)));
                let Some((model, weight)) = parsed else {
                    bail!("`{w}`: give MODEL=WEIGHT, a whole number weight");
                };
                alias.insert(model.to_owned(), json!(weight));
            }
            let api_at = Api::at(&api.url, api.api_key.as_deref())?;
            let catalog = api_at
                .call(reqwest::Method::GET, "/admin/v1/models", None)
                .await?;
            let existing = catalog["data"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["id"] == json!(id));
            let v = match existing {
                None => {
                    let entry = json!({ "id": id, "alias": alias });
                    api_at
                        .call(reqwest::Method::POST, "/admin/v1/models", Some(entry))
                        .await?
                }
                Some(m) => {
                    // A merge patch: models no longer named are removed.
                    let mut patch = alias.clone();
                    for old in m["spec"]["alias"].as_object().into_iter().flatten() {
                        patch.entry(old.0.clone()).or_insert(Value::Null);
                    }
                    api_at
                        .call(
                            reqwest::Method::PATCH,
                            &format!("/admin/v1/models/{id}"),
                            Some(json!({ "alias": patch })),
                        )
                        .await?
                }
            };
            print(api.json, &v, MODEL_COLUMNS);
        }
        ModelCommand::List { api } => {
            let v = Api::at(&api.url, api.api_key.as_deref())?
                .call(reqwest::Method::GET, "/admin/v1/models", None)
                .await?;
            print(api.json, &v, MODEL_COLUMNS);
        }
        ModelCommand::Undeploy { id, api } => {
            let v = Api::at(&api.url, api.api_key.as_deref())?
                .call(
                    reqwest::Method::DELETE,
                    &format!("/admin/v1/models/{id}"),
                    None,
                )
                .await?;
            if api.json {
                println!("{v}");
            } else {
                println!("{id}: undeployed; its replicas drain and stop");
            }
        }
        ModelCommand::Fetch { .. } | ModelCommand::Check { .. } => {
            unreachable!("fetched and checked without the API")
        }
    }
    Ok(())
}

/// `engine.KEY=VALUE` / `pool.KEY=VALUE`, the value read as TOML (a bare
/// word that is not TOML is a string).
fn parse_set(set: &str) -> Result<(&'static str, String, Value)> {
    let Some((path, value)) = set.split_once('=') else {
        bail!("--set `{set}`: give SECTION.KEY=VALUE");
    };
    let section = match path.split_once('.') {
        Some(("engine", _)) => "engine",
        Some(("pool", _)) => "pool",
        _ => bail!("--set `{set}`: the key must start with `engine.` or `pool.`"),
    };
    let key = path
        .split_once('.')
        .map(|(_, k)| k.trim())
        .unwrap_or_default();
    if key.is_empty() {
        bail!("--set `{set}`: no key after `{section}.`");
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => serde_json::to_value(t.remove("v")).context("--set value")?,
        Err(_) => Value::from(value),
    };
    Ok((section, key.to_owned(), value))
}

pub enum Format {
    Table,
    Json,
    Csv,
}

/// The cost ledger over `[since, until)`, summed `by` (or every line as CSV).
pub async fn cost_report(
    db: &str,
    by: strata_control::cost::GroupBy,
    since: i64,
    until: i64,
    format: Format,
) -> Result<()> {
    use strata_control::cost::{charges, focus_csv, report};
    use strata_core::store::{InstanceStore, UsageStore};
    let store = open_for_reading(db).await?;
    let instances = store.instances().await?;
    // Usage rows are bucketed by hour: read whole hours around the range.
    let hour = 3_600_000;
    let usage = store
        .usage_by_replica(
            since.div_euclid(hour) * hour,
            until.div_euclid(hour) * hour + hour,
        )
        .await?;
    let lines = charges(&instances, &usage, since, until, strata_core::now_ms());
    if let Format::Csv = format {
        print!("{}", focus_csv(&lines));
        return Ok(());
    }
    let rows = report(&lines, by);
    let total: f64 = rows.iter().map(|r| r.cost).sum();
    match format {
        Format::Json => {
            let v = json!({
                "since": strata_core::calendar::utc_timestamp(since),
                "until": strata_core::calendar::utc_timestamp(until),
                "total_usd": total,
                "lines": rows,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Format::Table => {
            println!(
                "cost {} .. {} (UTC)",
                strata_core::calendar::utc_timestamp(since),
                strata_core::calendar::utc_timestamp(until)
            );
            println!(
                "{:<32} {:>12} {:>12} {:>10}",
                "", "usd", "tokens", "inst-hours"
            );
            for r in &rows {
                let hours = if r.instance_hours > 0.0 {
                    format!("{:.3}", r.instance_hours)
                } else {
                    "-".into()
                };
                println!(
                    "{:<32} {:>12.6} {:>12} {:>10}",
                    r.key, r.cost, r.tokens, hours
                );
            }
            println!("{:<32} {:>12.6}", "total", total);
        }
        Format::Csv => {}
    }
    Ok(())
}

/// The database, without the keyring (nothing sealed is read); a missing
/// SQLite file is an error rather than a new database.
async fn open_for_reading(db: &str) -> Result<SqlStore> {
    Ok(if strata_core::config::is_postgres_url(db) {
        SqlStore::open_any(db, None).await?
    } else if Path::new(db).is_file() {
        SqlStore::open_without_vault(Path::new(db)).await?
    } else {
        bail!("no database at {db}");
    })
}

/// Prints the newest autoscaler decisions, oldest first.
pub async fn decisions(db: &str, limit: u32, json: bool) -> Result<()> {
    use strata_core::store::DecisionStore;
    let store = open_for_reading(db).await?;
    let rows = store.decisions(limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<8} {:>4} {:>4}  {:<10} inputs",
        "at (UTC)", "pool", "from", "to", "reason"
    );
    for d in rows {
        println!(
            "{:<20} {:<8} {:>4} {:>4}  {:<10} {}",
            strata_core::calendar::utc_timestamp(d.at_ms),
            d.pool,
            d.from_replicas,
            d.to_replicas,
            d.reason,
            d.inputs
        );
    }
    Ok(())
}

/// What runs now, from the database (one machine's SQLite or a cluster's
/// PostgreSQL): the acting controller, the replicas that have not ended
/// with their kind, state and price, the cost rate, and the gateways that
/// reported their load lately.
pub async fn status_of(config: &strata_core::config::Config, db: &str) -> Result<Value> {
    use strata_core::store::{InstanceState, InstanceStore, LeaseStore, LoadStore, ModelStore};
    let store = open_for_reading(db).await?;
    let (served, _) = crate::fleet::desired(config, &store.models().await?)?;
    let engines: Vec<Value> = served
        .iter()
        .map(|(m, _)| crate::fleet::engine_report(m))
        .collect();
    let now = strata_core::now_ms();
    let controller = store
        .lease("controller/default")
        .await?
        .filter(|l| l.expires_at_ms > now)
        .map(|l| json!({"holder": l.holder, "expires_in_s": (l.expires_at_ms - now) as f64 / 1000.0}));
    let running = store.running_instances().await?;
    let mut by_state = serde_json::Map::new();
    for state in [
        InstanceState::Starting,
        InstanceState::Ready,
        InstanceState::Stopped,
        InstanceState::Preempted,
    ] {
        let n = running.iter().filter(|i| i.state == state).count();
        by_state.insert(state.as_str().into(), json!(n));
    }
    let replicas: Vec<Value> = running
        .iter()
        .map(|i| {
            json!({
                "id": i.id,
                "pool": i.kind.pool,
                "instance_type": i.kind.instance_type,
                "zone": i.kind.zone,
                "capacity": i.kind.capacity.as_str(),
                "state": i.state.as_str(),
                "endpoint": i.endpoint,
                "up_s": ((now - i.started_at_ms).max(0) / 1000),
                "price_per_hour": i.kind.price_per_hour,
            })
        })
        .collect();
    let cost: f64 = running.iter().map(|i| i.kind.price_per_hour).sum();
    let gateways: Vec<Value> = store
        .gateway_loads(strata_control::cluster::FORGET_MS)
        .await?
        .into_iter()
        .filter(|g| g.model.is_empty() && g.age_ms <= strata_control::cluster::FRESH_MS)
        .map(|g| {
            json!({
                "gateway": g.gateway,
                "age_s": g.age_ms as f64 / 1000.0,
                "in_flight": g.load.in_flight,
                "waiting": g.load.waiting,
                "routable": g.load.routable,
            })
        })
        .collect();
    Ok(json!({
        "controller": controller,
        "replicas": replicas,
        "replicas_by_state": by_state,
        "cost_per_hour": cost,
        "gateways": gateways,
        "engines": engines,
    }))
}

/// `strata status`: `status_of` as tables, or as JSON.
pub async fn status(config: &strata_core::config::Config, db: &str, json_out: bool) -> Result<()> {
    let s = status_of(config, db).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    match &s["controller"] {
        Value::Null => println!("controller: none holds the lease (one machine: `strata serve`)"),
        c => println!(
            "controller: {} (lease for {:.1} s more)",
            cell(&c["holder"]),
            c["expires_in_s"].as_f64().unwrap_or(0.0)
        ),
    }
    let states: Vec<String> = s["replicas_by_state"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{v} {k}")).collect())
        .unwrap_or_default();
    println!(
        "replicas: {}; cost ${:.4}/h",
        states.join(", "),
        s["cost_per_hour"].as_f64().unwrap_or(0.0)
    );
    let replicas = s["replicas"].as_array().cloned().unwrap_or_default();
    if !replicas.is_empty() {
        println!(
            "\n{}",
            table(
                &replicas,
                &[
                    "id",
                    "pool",
                    "instance_type",
                    "zone",
                    "capacity",
                    "state",
                    "up_s",
                    "price_per_hour",
                    "endpoint"
                ],
            )
        );
    }
    let engines = s["engines"].as_array().cloned().unwrap_or_default();
    if !engines.is_empty() {
        println!(
            "\n{}",
            table(
                &engines,
                &[
                    "model",
                    "kind",
                    "prefix_cache",
                    "snapshots",
                    "cut_answers",
                    "gateway",
                    "tenant"
                ]
            )
        );
    }
    let gateways = s["gateways"].as_array().cloned().unwrap_or_default();
    if !gateways.is_empty() {
        println!(
            "\n{}",
            table(
                &gateways,
                &["gateway", "in_flight", "waiting", "routable", "age_s"]
            )
        );
    }
    Ok(())
}

/// Reads every audit row from the database and checks the chain under the
/// audit key, then against every checkpoint in `checkpoint_files`.
pub async fn verify_audit(
    config: &strata_core::config::Config,
    db: Option<&PathBuf>,
    checkpoint_files: &[PathBuf],
    json: bool,
) -> Result<()> {
    let database = config.store.database(db);
    if !strata_core::config::is_postgres_url(&database) && !Path::new(&database).is_file() {
        bail!("no database at {database}");
    }
    // The audit key is the keyring's: opened with the KEK, never a new one.
    let generated_kek = config.store.data_dir(db).join("kek");
    if std::env::var_os("STRATA_KEK").is_none()
        && config.security.kek_file.is_none()
        && !generated_kek.is_file()
    {
        bail!(
            "the audit trail is keyed with the keyring: verifying it needs the KEK \
             (STRATA_KEK, security.kek_file, or {})",
            generated_kek.display()
        );
    }
    let (store, _) = crate::launch::open_store_with_keyring(config, db).await?;
    let key = store.audit_key().await?;
    let rows = store.audit(None).await?;
    let mut checkpoints = Vec::new();
    for file in checkpoint_files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        checkpoints.extend(read_checkpoints(&text));
    }
    let outcome =
        verify_chain(&rows, &key).and_then(|()| verify_checkpoints(&rows, &checkpoints, &key));
    let head = rows.last().map(|r| r.hash.as_str());
    if json {
        let (ok, broken) = match &outcome {
            Ok(()) => (true, serde_json::Value::Null),
            Err(b) => (false, serde_json::json!({"seq": b.seq, "reason": b.reason})),
        };
        println!(
            "{}",
            serde_json::json!({"ok": ok, "rows": rows.len(), "checkpoints": checkpoints.len(),
                "head": head, "broken_at": broken})
        );
        if !ok {
            std::process::exit(1);
        }
        return Ok(());
    }
    match outcome {
        Ok(()) => {
            println!(
                "audit log ok: {} rows, head {}; {} checkpoints hold",
                rows.len(),
                head.unwrap_or("(empty)"),
                checkpoints.len()
            );
            if checkpoints.is_empty() {
                println!("without --checkpoints, rows dropped from the end cannot be seen");
            }
            Ok(())
        }
        Err(b) => bail!("audit log broken at row {}: {}", b.seq, b.reason),
    }
}

/// Every checkpoint in `text`: lines holding one as JSON (a checkpoint file
/// has one per line; a gateway's log has it after `audit_checkpoint=`).
fn read_checkpoints(text: &str) -> Vec<strata_core::tenant::AuditCheckpoint> {
    text.lines()
        .filter_map(|line| {
            let start = line.find("{\"seq\"")?;
            let end = line[start..].find('}')? + start + 1;
            serde_json::from_str(&line[start..end]).ok()
        })
        .collect()
}
