//! `cargo xtask package [--arch x86_64|arm64]`: the three functions built and started the way Lambda
//! runs them (docs/deploy.md).
//!
//! 1. **Build.** `cargo lambda build --release --output-format zip` for the functions of
//!    `infra/template.yaml` (their `BuildProperties.Binary`), for `--arch` (default: this machine's).
//!    The host's architecture builds with `--compiler cargo` (no zig); another one needs its Rust
//!    standard library (`rustup target add …`) and zig, and is refused with that advice when the
//!    standard library is missing. Zips land in `target/lambda-package/<arch>/<binary>/bootstrap.zip`;
//!    the binary and zip sizes are printed.
//! 2. **Start.** Each zip's `bootstrap` is unpacked into a temporary task root and started with a
//!    clean environment like Lambda's (`AWS_LAMBDA_RUNTIME_API`, function name / memory / version /
//!    log variables, the template's `RELAY_*`/`MAPILLARY_*` configuration, the client secret by ARN
//!    from moto's Secrets Manager as when deployed) behind a minimal Runtime
//!    API ([`crate::runtime_api`]), against a private moto holding a stack of the template and an
//!    in-process Mapillary simulator. One sample event from `events/` per function; zip-and-push's
//!    manifest notification is pointed at this stack's bucket, where a small generated sequence and
//!    its user's Mapillary connection are put first, so it does its real work. Printed per function:
//!    cold init (process start → first `GET …/invocation/next`), first response (event handed out →
//!    response or error posted), peak RSS, and whether the answer was a success. An error posted by
//!    the function is printed and fails the command. Only the host's architecture can be started.
//!
//! Function logs (JSON, as Lambda would ship them to CloudWatch) go to
//! `target/lambda-package/<arch>/logs/<binary>.log`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use integration_tests::esm::queue_arn;
use integration_tests::moto::MotoServer;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use mapillary_sim::{defaults, SimConfig, Simulator};
use relay_fixtures::{track, write_jpegs, TrackSpec};
use serde_json::Value;

use crate::binaries::vm_hwm_kib;
use crate::runtime_api::{Observed, RuntimeApi};
use crate::{push, venv};

/// An instruction set Lambda runs (`Architectures` in the template).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// x86_64 (`x86_64-unknown-linux-gnu`).
    #[value(name = "x86_64")]
    X86_64,
    /// Graviton (`aarch64-unknown-linux-gnu`): the template's default.
    #[value(name = "arm64")]
    Arm64,
}

impl Arch {
    /// The Rust target triple.
    pub fn triple(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// The template's (and Lambda's) name for it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The architecture of this machine, if Lambda has it.
    pub fn host() -> Option<Self> {
        if cfg!(target_arch = "x86_64") {
            Some(Arch::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Arch::Arm64)
        } else {
            None
        }
    }
}

/// The sample event each function is started with, by binary name (paths under the repository root).
const SAMPLE_EVENTS: [(&str, &str); 3] = [
    ("zip-and-push", "events/sqs/s3-manifest-created.json"),
    ("poller", "events/eventbridge/scheduled.json"),
    ("status-api", "events/apigw-v2/list-sequences.json"),
];
/// Images in the sequence zip-and-push's sample manifest announces.
const SAMPLE_IMAGES: usize = 8;
/// Stack name of the private stack the functions run against.
const STACK_NAME: &str = "relay-package";
/// How long a function may take from process start to its first `next` request. Lambda allows
/// 10 s for the init phase; more here because the machine is shared with builds and tests.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Slack beyond a function's own `Timeout` before its first response counts as never coming.
const RESPONSE_SLACK: Duration = Duration::from_secs(10);
const MIB: f64 = 1024.0 * 1024.0;

/// A function of the template, as the translated template describes it.
#[derive(Debug, Clone)]
pub(crate) struct Function {
    /// Logical id (`ZipAndPushFunction`).
    pub(crate) logical_id: String,
    /// `Metadata.BuildProperties.Binary`, also its package name.
    pub(crate) binary: String,
    /// `MemorySize` in MB.
    pub(crate) memory_mb: u64,
    /// `Timeout` in seconds.
    pub(crate) timeout_s: u64,
    /// `Environment.Variables` (Globals merged in by the translation): a literal or a parameter
    /// `Ref` resolved to the parameter's default, `None` for what only a stack can resolve (a
    /// resource's `Ref`, `GetAtt`): the local stack's [`LocalStack::lambda_env`] supplies those.
    pub(crate) variables: BTreeMap<String, Option<String>>,
}

/// A built package.
#[derive(Debug)]
struct Package {
    function: Function,
    zip_bytes: u64,
    binary_bytes: u64,
}

/// What starting one package showed.
#[derive(Debug, Default)]
struct StartReport {
    /// Process start → first `next` request.
    cold_init: Option<Duration>,
    /// Event handed out → response or error posted.
    first_response: Option<Duration>,
    /// `VmHWM` of the process after its answer, KiB.
    peak_rss_kib: Option<u64>,
    /// Whether the answer was a success.
    ok: bool,
    /// What the answer was, in a few words.
    summary: String,
}

/// `cargo xtask package [--arch A]`.
pub async fn run(root: &Path, arch: Option<Arch>) -> Result<()> {
    let host = Arch::host();
    let arch = match arch.or(host) {
        Some(a) => a,
        None => bail!("this machine is neither x86_64 nor aarch64: pass --arch x86_64|arm64"),
    };
    let venvs = venv::ensure(root)?;
    let template = stack::translate_template(&venvs, &stack::template_path())?;
    let functions = functions(&template)?;
    let template_arch = template["Parameters"]["Architecture"]["Default"]
        .as_str()
        .unwrap_or("?")
        .to_string();

    check_target(arch, host)?;
    let out = root.join("target/lambda-package").join(arch.name());
    let t0 = Instant::now();
    build(root, &venvs, arch, host, &out, &functions)?;
    eprintln!(
        "package: built in {:.0} s (target/lambda-package/{})",
        t0.elapsed().as_secs_f64(),
        arch.name()
    );

    let work = tempfile::Builder::new().prefix("relay-package-").tempdir()?;
    let mut packages = Vec::new();
    for f in &functions {
        let zip = out.join(&f.binary).join("bootstrap.zip");
        let task_root = work.path().join(&f.binary);
        let (zip_bytes, binary_bytes) = unpack(&zip, &task_root)?;
        println!(
            "package: {:<13} {arch:<6}  binary {:>6.2} MiB ({binary_bytes} B)  zip {:>6.2} MiB ({zip_bytes} B)  {}",
            f.binary,
            binary_bytes as f64 / MIB,
            zip_bytes as f64 / MIB,
            rel(root, &zip),
            arch = arch.name(),
        );
        packages.push(Package {
            function: f.clone(),
            zip_bytes,
            binary_bytes,
        });
    }
    if arch.name() != template_arch {
        println!(
            "package: the template's Architecture defaults to {template_arch}; deploy these zips with \
             Architecture={} (docs/deploy.md)",
            arch.name()
        );
    }
    if Some(arch) != host {
        println!(
            "package: {} binaries cannot be started on this {} machine; the start-up measurement runs \
             for the host's architecture only",
            arch.name(),
            host.map(Arch::name).unwrap_or("unknown")
        );
        return Ok(());
    }

    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let reports = start_all(root, &venvs, &packages, work.path(), &logs).await?;
    print_table(arch, &packages, &reports);
    let failed: Vec<&str> = packages
        .iter()
        .zip(&reports)
        .filter(|(_, r)| !r.ok)
        .map(|(p, _)| p.function.binary.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} did not answer its sample event successfully (logs in {})",
            failed.join(", "),
            rel(root, &logs)
        );
    }
    Ok(())
}

/// `path` relative to the repository root when it is under it.
fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).display().to_string()
}

/// The template's functions, in [`SAMPLE_EVENTS`] order; every function needs a sample event.
pub(crate) fn functions(template: &Value) -> Result<Vec<Function>> {
    let resources = template["Resources"]
        .as_object()
        .ok_or_else(|| anyhow!("the translated template has no Resources"))?;
    let mut found = BTreeMap::new();
    for (id, r) in resources {
        if r["Type"] != "AWS::Lambda::Function" {
            continue;
        }
        let binary = r["Metadata"]["BuildProperties"]["Binary"]
            .as_str()
            .ok_or_else(|| anyhow!("{id} has no Metadata.BuildProperties.Binary"))?;
        let p = &r["Properties"];
        let number = |key: &str| {
            p[key]
                .as_u64()
                .ok_or_else(|| anyhow!("{id}: {key} is not a number: {}", p[key]))
        };
        found.insert(
            binary.to_string(),
            Function {
                logical_id: id.clone(),
                binary: binary.to_string(),
                memory_mb: number("MemorySize")?,
                timeout_s: number("Timeout")?,
                variables: p["Environment"]["Variables"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), parameter_default(template, v)))
                    .collect(),
            },
        );
    }
    let mut out = Vec::new();
    for (binary, _) in SAMPLE_EVENTS {
        out.push(
            found
                .remove(binary)
                .ok_or_else(|| anyhow!("the template has no function with Binary {binary}"))?,
        );
    }
    if let Some(extra) = found.keys().next() {
        bail!("function {extra} of the template has no sample event in xtask/src/package.rs");
    }
    Ok(out)
}

/// Refuses a foreign architecture whose standard library is not installed (cargo would fail later
/// with "can't find crate for `core`").
fn check_target(arch: Arch, host: Option<Arch>) -> Result<()> {
    if Some(arch) == host {
        return Ok(());
    }
    let output = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    match missing_std(arch, &sysroot) {
        Some(missing) => Err(anyhow!(missing_std_advice(arch, &missing))),
        None => Ok(()),
    }
}

/// The standard library directory of `arch` under `sysroot`, when it is missing.
fn missing_std(arch: Arch, sysroot: &Path) -> Option<PathBuf> {
    let dir = sysroot.join("lib/rustlib").join(arch.triple()).join("lib");
    (!dir.is_dir()).then_some(dir)
}

fn missing_std_advice(arch: Arch, missing: &Path) -> String {
    format!(
        "cannot build for {arch}: the Rust standard library for {triple} is not installed \
         ({missing} is missing). Install it with `rustup target add {triple}`, and a linker for it: \
         zig (`pip install ziglang`; `.venv/aws` has it, as a dependency of cargo-lambda), which \
         `cargo lambda build` uses for foreign targets, or build inside `cross`. Then run \
         `cargo xtask package --arch {arch}` again (docs/deploy.md).",
        arch = arch.name(),
        triple = arch.triple(),
        missing = missing.display(),
    )
}

/// `cargo lambda build --release --output-format zip` for every function into `out/<binary>/`.
fn build(
    root: &Path,
    venvs: &venv::Venvs,
    arch: Arch,
    host: Option<Arch>,
    out: &Path,
    functions: &[Function],
) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `cargo run` (the `cargo xtask` alias) gives this process xtask's CARGO_PKG_*/CARGO_MANIFEST_*
    // variables. Build scripts that watch such variables (ring's watches CARGO_PKG_NAME) would see
    // them change between this build and the same `cargo lambda build` typed in a shell, and both
    // would rebuild the release dependencies (~10-30 min here) each time the other ran.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*k,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(root)
        // cargo-lambda is a cargo subcommand found on PATH (.venv/aws/bin).
        .env("PATH", venvs.path_with_aws_bin())
        // cargo-lambda offers to install zig interactively when it lacks it: never wait for an answer.
        .stdin(Stdio::null())
        .args(["lambda", "build", "--release", "--output-format", "zip"])
        .args(["--target", arch.triple()])
        .arg("--lambda-dir")
        .arg(out);
    // The host's target needs no cross linker; zig (cargo-zigbuild) only for a foreign one.
    let compiler = if Some(arch) == host {
        "cargo"
    } else {
        "cargo-zigbuild"
    };
    cmd.args(["--compiler", compiler]);
    for f in functions {
        cmd.args(["--package", &f.binary, "--bin", &f.binary]);
    }
    eprintln!(
        "package: cargo lambda build --release --compiler {compiler} --target {} --output-format zip ({})",
        arch.triple(),
        functions
            .iter()
            .map(|f| f.binary.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let status = cmd.status().context("running cargo lambda build")?;
    if !status.success() {
        bail!("cargo lambda build failed ({status})");
    }
    Ok(())
}

/// Unpacks `bootstrap` from `zip` into `task_root` (mode 0755, as Lambda requires); returns
/// (zip size, binary size). Fails unless the zip holds exactly an executable `bootstrap`.
fn unpack(zip: &Path, task_root: &Path) -> Result<(u64, u64)> {
    let file = File::open(zip).with_context(|| format!("opening {}", zip.display()))?;
    let zip_bytes = file.metadata()?.len();
    let mut archive = zip::ZipArchive::new(file).with_context(|| format!("reading {}", zip.display()))?;
    let names: Vec<String> = archive
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", zip.display()))?;
    if names != ["bootstrap"] {
        bail!("{} holds {names:?}, not just bootstrap", zip.display());
    }
    let mut entry = archive.by_name("bootstrap")?;
    if entry.unix_mode().is_some_and(|m| m & 0o111 == 0) {
        bail!(
            "bootstrap in {} is not executable (mode {:o})",
            zip.display(),
            entry.unix_mode().unwrap_or_default()
        );
    }
    let binary_bytes = entry.size();
    let mut bytes = Vec::with_capacity(usize::try_from(binary_bytes).unwrap_or(0));
    entry
        .read_to_end(&mut bytes)
        .with_context(|| format!("inflating bootstrap from {}", zip.display()))?;
    std::fs::create_dir_all(task_root)?;
    let path = task_root.join("bootstrap");
    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok((zip_bytes, binary_bytes))
}

/// Starts moto + a stack of the template + the simulator, then each package with its sample event.
async fn start_all(
    root: &Path,
    venvs: &venv::Venvs,
    packages: &[Package],
    work: &Path,
    logs: &Path,
) -> Result<Vec<StartReport>> {
    let moto = MotoServer::start(venvs)?;
    eprintln!("package: moto at {}", moto.endpoint());
    let stack = LocalStack::create(moto.endpoint(), STACK_NAME).await?;
    let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0").await?;
    eprintln!("package: simulator at {}", sim.base_url());
    let endpoints = SimEndpoints::from_base(sim.base_url(), defaults::APP_ID, defaults::CLIENT_SECRET);
    let stack_env = stack.lambda_env(&endpoints);
    let function_stack_env = with_secret_by_arn(&stack, &stack_env).await?;

    let mut reports = Vec::new();
    for p in packages {
        let f = &p.function;
        let path = SAMPLE_EVENTS
            .iter()
            .find(|(b, _)| *b == f.binary)
            .map(|(_, path)| root.join(path))
            .ok_or_else(|| anyhow!("no sample event for {}", f.binary))?;
        let mut event: Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?;
        if f.binary == "zip-and-push" {
            event = seed_manifest_event(event, &stack, &stack_env, &work.join("images")).await?;
        }
        let env = function_env(f, &function_stack_env, &work.join(&f.binary))?;
        eprintln!(
            "package: starting {} with {} ({} MB, timeout {} s)",
            f.binary,
            rel(root, &path),
            f.memory_mb,
            f.timeout_s
        );
        let report = start_one(
            f,
            &work.join(&f.binary),
            env,
            Bytes::from(event.to_string()),
            &logs.join(format!("{}.log", f.binary)),
        )
        .await?;
        println!(
            "start:   {:<13} cold init {}  first response {}  peak RSS {}  {} {}",
            f.binary,
            ms(report.cold_init),
            ms(report.first_response),
            report
                .peak_rss_kib
                .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "—".into()),
            if report.ok { "ok:" } else { "FAILED:" },
            report.summary
        );
        reports.push(report);
    }
    drop(sim);
    drop(moto);
    Ok(reports)
}

/// `stack_env` as deployed functions see it: the client secret only by ARN, from a secret created in
/// moto's Secrets Manager, so the cold start fetches it as it does on Lambda (the local stacks pass
/// it plain, `MAPILLARY_CLIENT_SECRET`).
async fn with_secret_by_arn(
    stack: &LocalStack,
    stack_env: &[(String, String)],
) -> Result<Vec<(String, String)>> {
    let secret = stack_env
        .iter()
        .find(|(k, _)| k == "MAPILLARY_CLIENT_SECRET")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| anyhow!("the local stack's environment has no MAPILLARY_CLIENT_SECRET"))?;
    let created = aws_sdk_secretsmanager::Client::new(stack.sdk_config())
        .create_secret()
        .name(format!("{STACK_NAME}/mapillary-client-secret"))
        .secret_string(secret)
        .send()
        .await
        .context("CreateSecret in moto")?;
    let arn = created
        .arn()
        .ok_or_else(|| anyhow!("CreateSecret returned no ARN"))?
        .to_string();
    Ok(stack_env
        .iter()
        .filter(|(k, _)| k != "MAPILLARY_CLIENT_SECRET")
        .map(|(k, v)| {
            let v = if k == "MAPILLARY_CLIENT_SECRET_ARN" {
                arn.clone()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect())
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "—".into())
}

/// The environment Lambda would give `f` (clean: nothing from this process leaks in): the runtime's
/// own variables, the stack's `RELAY_*`/`MAPILLARY_*`/AWS endpoint variables, and `f`'s own template
/// variables resolved from the parameters' defaults. Every template variable must get a value.
pub(crate) fn function_env(
    f: &Function,
    stack_env: &[(String, String)],
    task_root: &Path,
) -> Result<Vec<(String, String)>> {
    let name = format!("{STACK_NAME}-{}", f.logical_id);
    let task_root = task_root.display().to_string();
    let mut env: Vec<(String, String)> = [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("LANG", "en_US.UTF-8"),
        ("TZ", ":UTC"),
        ("LAMBDA_TASK_ROOT", &task_root),
        ("LAMBDA_RUNTIME_DIR", &task_root),
        ("_HANDLER", "bootstrap"),
        ("AWS_LAMBDA_FUNCTION_NAME", &name),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", &f.memory_mb.to_string()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", &format!("/aws/lambda/{name}")),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "2026/01/01/[$LATEST]local"),
        // The template's LoggingConfig (LogFormat JSON, ApplicationLogLevel INFO).
        ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
        ("AWS_LAMBDA_LOG_LEVEL", "INFO"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(stack_env.iter().cloned());
    for (key, value) in &f.variables {
        if stack_env.iter().any(|(k, _)| k == key) {
            continue;
        }
        let value = value.clone().ok_or_else(|| {
            anyhow!(
                "{}: variable {key} depends on the stack, and the local stack does not provide it \
                 (integration_tests::stack::LocalStack::lambda_env)",
                f.logical_id
            )
        })?;
        env.push((key.clone(), value));
    }
    Ok(env)
}

/// A template value as a string when the template alone decides it: a literal, or a `Ref` to a
/// parameter with a default.
fn parameter_default(template: &Value, value: &Value) -> Option<String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    match value {
        Value::Object(o) => {
            let param = o.get("Ref")?.as_str()?;
            scalar(&template["Parameters"][param]["Default"])
        }
        other => scalar(other),
    }
}

/// Points zip-and-push's sample manifest notification at `stack`'s bucket and queue, and puts what it
/// announces there: [`SAMPLE_IMAGES`] generated geotagged JPEGs and `manifest.json` under the event's
/// `sequences/<user>/<sequence>/`, with the user connected to the simulator's demo account.
async fn seed_manifest_event(
    mut event: Value,
    stack: &LocalStack,
    stack_env: &[(String, String)],
    images: &Path,
) -> Result<Value> {
    let record = &mut event["Records"][0];
    let body = record["body"]
        .as_str()
        .ok_or_else(|| anyhow!("the sample SQS record has no body"))?;
    let mut notification: Value = serde_json::from_str(body).context("the sample record's body")?;
    let s3 = &mut notification["Records"][0]["s3"];
    let key = s3["object"]["key"]
        .as_str()
        .ok_or_else(|| anyhow!("the sample notification has no object key"))?
        .to_string();
    s3["bucket"]["name"] = Value::String(stack.bucket.clone());
    s3["bucket"]["arn"] = Value::String(format!("arn:aws:s3:::{}", stack.bucket));
    record["body"] = Value::String(notification.to_string());
    record["eventSourceARN"] = Value::String(queue_arn(&stack.ingest_queue_url));

    // The sample key is plain (no form-encoding), as the sample is written.
    let parts: Vec<&str> = key.split('/').collect();
    let (user, prefix) = match parts.as_slice() {
        ["sequences", user, sequence, "manifest.json"] => (*user, format!("sequences/{user}/{sequence}/")),
        _ => bail!("the sample manifest key {key:?} is not sequences/<user>/<sequence>/manifest.json"),
    };
    let start = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    write_jpegs(
        images,
        &track(SAMPLE_IMAGES, &TrackSpec::new(50.8225, -0.1372, start)),
    )
    .context("writing the sample images")?;
    let s3 = stack.s3();
    push::put_files(&s3, &stack.bucket, &prefix, &push::jpegs_under(images)?).await?;
    s3.put_object()
        .bucket(&stack.bucket)
        .key(&key)
        .body(ByteStream::from_static(b"{}"))
        .send()
        .await
        .context("PutObject manifest.json")?;
    let env: BTreeMap<String, String> = stack_env.iter().cloned().collect();
    let (_, deps) = push::deps_from_env(&env).await?;
    push::connect_user(&deps.tokens, user).await?;
    eprintln!(
        "package: {SAMPLE_IMAGES} images + manifest.json in s3://{}/{prefix}, {user} connected to the simulator",
        stack.bucket
    );
    Ok(event)
}

/// Starts `task_root/bootstrap` behind a fresh Runtime API with `event` queued, and times it.
async fn start_one(
    f: &Function,
    task_root: &Path,
    env: Vec<(String, String)>,
    event: Bytes,
    log: &Path,
) -> Result<StartReport> {
    let arn = format!(
        "arn:aws:lambda:{}:{}:function:{STACK_NAME}-{}",
        stack::REGION,
        stack::ACCOUNT_ID,
        f.logical_id
    );
    let mut api = RuntimeApi::start(&arn).await?;
    let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let timeout = Duration::from_secs(f.timeout_s);
    let request_id = api.invoke(event, timeout).await?;

    let bootstrap = task_root.join("bootstrap");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&bootstrap)
        .env_clear()
        .envs(env)
        .env("AWS_LAMBDA_RUNTIME_API", api.address())
        .current_dir(task_root)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bootstrap.display()))?;
    let pid = child.id();

    let mut report = StartReport::default();
    let mut delivered = None;
    let mut deadline = tokio::time::Instant::from_std(started + INIT_TIMEOUT);
    loop {
        tokio::select! {
            observed = api.observe() => match observed {
                None => {
                    report.summary = "the Runtime API server stopped".into();
                    break;
                }
                Some(Observed::NextRequested(at)) => {
                    if report.cold_init.is_none() {
                        report.cold_init = Some(at - started);
                        deadline = tokio::time::Instant::now() + timeout + RESPONSE_SLACK;
                    }
                }
                Some(Observed::Delivered { at, request_id: id }) => {
                    if id != request_id {
                        report.summary = format!("handed out {id}, expected {request_id}");
                        break;
                    }
                    delivered = Some(at);
                }
                Some(Observed::Response { at, body, request_id: id }) => {
                    report.first_response = delivered.map(|d| at - d);
                    report.peak_rss_kib = pid.and_then(vm_hwm_kib);
                    (report.ok, report.summary) = judge(&body);
                    if id != request_id {
                        report.ok = false;
                        report.summary = format!("response for {id}, expected {request_id}");
                    }
                    break;
                }
                Some(Observed::Error { at, error_type, body, request_id: id }) => {
                    report.first_response = delivered.map(|d| at - d);
                    report.peak_rss_kib = pid.and_then(vm_hwm_kib);
                    report.summary = format!(
                        "error posted for {id} ({}): {}",
                        error_type.as_deref().unwrap_or("no type"),
                        clip(&String::from_utf8_lossy(&body), 300)
                    );
                    break;
                }
                Some(Observed::InitError { at, error_type, body }) => {
                    report.summary = format!(
                        "init error posted after {:.0} ms ({}): {}",
                        (at - started).as_secs_f64() * 1000.0,
                        error_type.as_deref().unwrap_or("no type"),
                        clip(&String::from_utf8_lossy(&body), 300)
                    );
                    break;
                }
                Some(Observed::Refused { what, .. }) => {
                    report.summary = format!("Runtime API protocol error: {what}");
                    break;
                }
            },
            status = child.wait() => {
                report.summary = format!(
                    "the process exited ({}) before answering; last log lines:\n{}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    tail(log, 10)
                );
                break;
            }
            _ = tokio::time::sleep_until(deadline) => {
                report.summary = match report.cold_init {
                    None => format!("no /next request within {} s of starting", INIT_TIMEOUT.as_secs()),
                    Some(_) => format!("no answer within its timeout of {} s", f.timeout_s),
                };
                break;
            }
        }
    }
    // Like Lambda after the invocation: the environment is frozen (here: ended).
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(report)
}

/// Whether a response payload is a success, and a short description: an SQS batch response with
/// failures or an HTTP response with a 5xx status is not.
fn judge(body: &[u8]) -> (bool, String) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (true, format!("{} bytes (not JSON)", body.len()));
    };
    if let Some(failures) = v.get("batchItemFailures").and_then(Value::as_array) {
        return (
            failures.is_empty(),
            format!("batchItemFailures: {}", Value::Array(failures.clone())),
        );
    }
    if let Some(code) = v.get("statusCode").and_then(Value::as_u64) {
        let body = v.get("body").and_then(Value::as_str).unwrap_or_default();
        return (code < 500, format!("HTTP {code} {}", clip(body, 160)));
    }
    (true, clip(&v.to_string(), 160))
}

fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The figures as a Markdown table (docs/deploy.md records them).
fn print_table(arch: Arch, packages: &[Package], reports: &[StartReport]) {
    println!();
    println!(
        "| Function ({}) | Binary (MiB) | Zip (MiB) | Memory (MB) | Cold init (ms) | First response (ms) | Peak RSS (MiB) | Result |",
        arch.name()
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for (p, r) in packages.iter().zip(reports) {
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "—".into())
        };
        println!(
            "| {} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            p.function.binary,
            p.binary_bytes as f64 / MIB,
            p.zip_bytes as f64 / MIB,
            p.function.memory_mb,
            ms(r.cold_init),
            ms(r.first_response),
            r.peak_rss_kib
                .map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_else(|| "—".into()),
            if r.ok {
                format!("ok: {}", r.summary.replace('|', "\\|"))
            } else {
                "FAILED".into()
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_failures_and_server_errors_are_not_success() {
        assert!(judge(br#"{"batchItemFailures":[]}"#).0);
        assert!(!judge(br#"{"batchItemFailures":[{"itemIdentifier":"m1"}]}"#).0);
        assert!(judge(br#"{"statusCode":404,"body":"{}"}"#).0);
        assert!(!judge(br#"{"statusCode":503,"body":"down"}"#).0);
        assert!(judge(b"null").0);
    }

    #[test]
    fn variables_resolve_from_literals_and_parameter_defaults_only() {
        let template = serde_json::json!({"Parameters": {
            "Scope": {"Type": "String", "Default": "read"},
            "Ttl": {"Type": "Number", "Default": 600},
            "Secret": {"Type": "String"},
        }});
        let resolve = |v: Value| parameter_default(&template, &v);
        assert_eq!(resolve(serde_json::json!("x")).as_deref(), Some("x"));
        assert_eq!(
            resolve(serde_json::json!({"Ref": "Scope"})).as_deref(),
            Some("read")
        );
        assert_eq!(resolve(serde_json::json!({"Ref": "Ttl"})).as_deref(), Some("600"));
        assert_eq!(resolve(serde_json::json!({"Ref": "Secret"})), None, "no default");
        assert_eq!(
            resolve(serde_json::json!({"Ref": "SequencesBucket"})),
            None,
            "a resource"
        );
        assert_eq!(resolve(serde_json::json!({"Fn::GetAtt": ["Key", "Arn"]})), None);
    }

    #[test]
    fn a_missing_standard_library_is_refused_with_the_install_command() {
        let sysroot = tempfile::tempdir().unwrap();
        let missing = missing_std(Arch::Arm64, sysroot.path()).expect("empty sysroot");
        assert!(missing.ends_with("lib/rustlib/aarch64-unknown-linux-gnu/lib"));
        let advice = missing_std_advice(Arch::Arm64, &missing);
        assert!(
            advice.contains("rustup target add aarch64-unknown-linux-gnu"),
            "{advice}"
        );
        assert!(advice.contains("zig"), "{advice}");
        std::fs::create_dir_all(&missing).unwrap();
        assert_eq!(missing_std(Arch::Arm64, sysroot.path()), None);
    }

    #[test]
    fn the_functions_come_from_the_template_in_sample_order() {
        let f = |binary: &str, mem: u64| {
            serde_json::json!({
                "Type": "AWS::Lambda::Function",
                "Metadata": {"BuildProperties": {"Binary": binary}},
                "Properties": {"MemorySize": mem, "Timeout": 30,
                    "Environment": {"Variables": {"RELAY_BUCKET": {"Ref": "SequencesBucket"}}}},
            })
        };
        let mut template = serde_json::json!({"Resources": {
            "StatusApiFunction": f("status-api", 512),
            "PollerFunction": f("poller", 512),
            "ZipAndPushFunction": f("zip-and-push", 1024),
            "Bucket": {"Type": "AWS::S3::Bucket"},
        }});
        let found = functions(&template).unwrap();
        let names: Vec<&str> = found.iter().map(|f| f.binary.as_str()).collect();
        assert_eq!(names, ["zip-and-push", "poller", "status-api"]);
        assert_eq!(found[0].memory_mb, 1024);
        assert_eq!(found[0].variables["RELAY_BUCKET"], None);

        template["Resources"]["Other"] = f("other", 128);
        let err = functions(&template).unwrap_err().to_string();
        assert!(err.contains("other") && err.contains("no sample event"), "{err}");
    }
}
