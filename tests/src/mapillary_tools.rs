//! A runner for the real `mapillary_tools` (0.14.7, from `.venv/mapillary-tools`) pointed at the Mapillary
//! simulator: the conformance tests and `cargo xtask demo` use it.
//!
//! [`MapillaryTools::new`] prepares a scratch directory holding the INI profile (`MAPILLARY_CONFIG_PATH`), the
//! upload history (`MAPILLARY_UPLOAD_HISTORY_PATH`) and the image-handle cache
//! (`MAPILLARY_TOOLS_UPLOAD_CACHE_DIR`), so runs never touch the user's own mapillary_tools state and never
//! suppress requests because of an earlier run (protocol doc §11). `/me` verification and `POST /logging` stay
//! enabled so the simulator sees the complete request sequence of §10.
//!
//! The calls are blocking (`std::process`); from async code wrap them in `tokio::task::spawn_blocking`.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// Name of the description file `mapillary_tools process` writes into the import directory.
pub const DESCRIPTION_FILENAME: &str = "mapillary_image_description.json";

/// Profile (INI section) name the runner writes and passes as `--user_name`.
pub const PROFILE: &str = "relay";

/// Keys of a description-file entry that are not part of the EXIF ImageDescription JSON (§4.4).
const NON_EXIF_KEYS: [&str; 5] = ["filename", "md5sum", "filesize", "filetype", "MAPSequenceUUID"];

/// Lines of captured output quoted in error messages.
const TAIL_LINES: usize = 40;

/// Errors of the runner.
#[derive(Debug, thiserror::Error)]
pub enum ToolsError {
    /// The executable is missing (the venv was not created).
    #[error("mapillary_tools not found at {0}: run `cargo xtask setup`")]
    Missing(PathBuf),
    /// File-system work in the scratch directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// The process ended unsuccessfully.
    #[error("`mapillary_tools {args}` exited with {code}\n--- output tail ---\n{tail}")]
    Failed {
        args: String,
        code: String,
        tail: String,
    },
    /// A JSON file written by mapillary_tools could not be read.
    #[error("invalid JSON in {path}: {message}")]
    Json { path: PathBuf, message: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ToolsError {
    let path = path.to_path_buf();
    move |source| ToolsError::Io { what, path, source }
}

/// Base URLs mapillary_tools is pointed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// `MAPILLARY_GRAPH_API_ENDPOINT`, e.g. `http://127.0.0.1:PORT/graph` (no trailing slash).
    pub graph: String,
    /// `MAPILLARY_UPLOAD_ENDPOINT`, e.g. `http://127.0.0.1:PORT/rupload`.
    pub upload: String,
}

/// The identity mapillary_tools uploads as.
#[derive(Clone)]
pub struct Account {
    /// `MAPILLARY_CLIENT_TOKEN` (used for `/logging`).
    pub client_token: String,
    /// `user_upload_token` of the profile.
    pub user_token: String,
    /// `MAPSettingsUsername`.
    pub username: String,
    /// `MAPSettingsUserKey` (numeric user id).
    pub user_id: String,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("client_token", &"[REDACTED]")
            .field("user_token", &"[REDACTED]")
            .field("username", &self.username)
            .field("user_id", &self.user_id)
            .finish()
    }
}

/// The captured result of one run.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl RunOutput {
    /// Whether the process exited with 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The last `lines` lines of stdout followed by those of stderr.
    pub fn tail(&self, lines: usize) -> String {
        fn last(s: &str, n: usize) -> String {
            let v: Vec<&str> = s.lines().collect();
            v[v.len().saturating_sub(n)..].join("\n")
        }
        format!(
            "[stdout]\n{}\n[stderr]\n{}",
            last(&self.stdout, lines),
            last(&self.stderr, lines)
        )
    }
}

/// One entry of the description file written by `process`.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    /// The entry exactly as written.
    pub raw: Map<String, Value>,
}

impl Description {
    /// `filename` (the image path as mapillary_tools recorded it).
    pub fn filename(&self) -> Option<&str> {
        self.raw.get("filename").and_then(Value::as_str)
    }

    /// Base name of [`Description::filename`].
    pub fn file_name(&self) -> Option<String> {
        self.filename()
            .and_then(|f| Path::new(f).file_name())
            .map(|n| n.to_string_lossy().into_owned())
    }

    /// `MAPSequenceUUID` (the client-side sequence this image belongs to).
    pub fn sequence_uuid(&self) -> Option<&str> {
        self.raw.get("MAPSequenceUUID").and_then(Value::as_str)
    }

    /// `MAPCaptureTime` (`YYYY_MM_DD_HH_MM_SS_mmm`, UTC).
    pub fn capture_time(&self) -> Option<&str> {
        self.raw.get("MAPCaptureTime").and_then(Value::as_str)
    }

    /// The processing error, for entries `process` rejected.
    pub fn error(&self) -> Option<&Value> {
        self.raw.get("error")
    }

    /// What mapillary_tools writes into the uploaded JPEG's EXIF ImageDescription: every `MAP*` key except
    /// `MAPSequenceUUID` (`desc_file_to_exif`, §4.4).
    pub fn exif_description(&self) -> Value {
        Value::Object(
            self.raw
                .iter()
                .filter(|(k, _)| k.starts_with("MAP") && !NON_EXIF_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
}

/// One upload-history record (§10.5): written after a successful `finish_upload`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRecord {
    /// The record file.
    pub path: PathBuf,
    /// `summary.cluster_id` as a string (the id the server returned).
    pub cluster_id: Option<String>,
    /// `summary.sequence_md5sum` (the record's key).
    pub sequence_md5sum: Option<String>,
    /// `summary.sequence_uuid`, when the upload was an image sequence.
    pub sequence_uuid: Option<String>,
    /// The whole record.
    pub raw: Value,
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value, ToolsError> {
    let text = fs::read_to_string(path).map_err(io("reading", path))?;
    serde_json::from_str(&text).map_err(|e| ToolsError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads a description file written by `mapillary_tools process` (a JSON array of objects).
pub fn read_descriptions(path: &Path) -> Result<Vec<Description>, ToolsError> {
    let bad = |message: String| ToolsError::Json {
        path: path.to_path_buf(),
        message,
    };
    match read_json(path)? {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(raw) => Ok(Description { raw }),
                other => Err(bad(format!("entry {i} is not an object: {other}"))),
            })
            .collect(),
        other => Err(bad(format!(
            "expected an array, got {}",
            other.to_string().chars().take(80).collect::<String>()
        ))),
    }
}

/// Writes a description file containing `[]` (what `upload <zip dir> --desc_path` needs, §10.2).
pub fn write_empty_descriptions(path: &Path) -> Result<(), ToolsError> {
    fs::write(path, "[]").map_err(io("writing", path))
}

/// The real mapillary_tools, configured for one account against one simulator.
pub struct MapillaryTools {
    program: PathBuf,
    scratch: PathBuf,
    env: Vec<(&'static str, OsString)>,
}

impl fmt::Debug for MapillaryTools {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The environment holds the client token: never print it.
        f.debug_struct("MapillaryTools")
            .field("program", &self.program)
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

/// Variables that would change the request sequence or the isolation if inherited from the caller's shell.
const CLEARED_ENV: [&str; 6] = [
    "MAPILLARY_TOOLS__AUTH_VERIFICATION_DISABLED",
    "MAPILLARY_DISABLE_API_LOGGING",
    "MAPILLARY__ENABLE_UPLOAD_HISTORY_FOR_DRY_RUN",
    "MAPILLARY_TOOLS_UPLOAD_CHUNK_SIZE_MB",
    "MAPILLARY_TOOLS_MAX_UPLOAD_RETRIES",
    "NODE_CHANNEL_FD",
];

impl MapillaryTools {
    /// Prepares `scratch` (created if missing): `config.ini` with the [`PROFILE`] profile, `history/` and
    /// `cache/`. `program` is the `mapillary_tools` executable (`Venvs::mapillary_tools()`).
    ///
    /// The profile is written directly, as `mapillary_tools authenticate --jwt <token>` would write it; see
    /// [`MapillaryTools::without_profile`] and [`MapillaryTools::authenticate_with_password`] for the path
    /// where mapillary_tools obtains the token itself.
    pub fn new(
        program: impl Into<PathBuf>,
        scratch: &Path,
        endpoints: &Endpoints,
        account: &Account,
    ) -> Result<Self, ToolsError> {
        let tools = Self::without_profile(program, scratch, endpoints, &account.client_token)?;
        // §11: only user_upload_token is required; the other two keep `upload` from asking `/me` twice and
        // are shown in its "Uploading to profile" line.
        let ini = format!(
            "[{PROFILE}]\nuser_upload_token = {}\nMAPSettingsUsername = {}\nMAPSettingsUserKey = {}\n",
            account.user_token, account.username, account.user_id
        );
        let config = tools.config_path();
        fs::write(&config, ini).map_err(io("writing", &config))?;
        Ok(tools)
    }

    /// Like [`MapillaryTools::new`], but with no profile yet (no `config.ini`): the account's user upload
    /// token has to come from [`MapillaryTools::authenticate_with_password`], as it does for a user who runs
    /// `mapillary_tools authenticate`. `client_token` is `MAPILLARY_CLIENT_TOKEN` (it authenticates
    /// `/login` and `/logging`).
    pub fn without_profile(
        program: impl Into<PathBuf>,
        scratch: &Path,
        endpoints: &Endpoints,
        client_token: &str,
    ) -> Result<Self, ToolsError> {
        let program = program.into();
        if !program.is_file() {
            return Err(ToolsError::Missing(program));
        }
        let history = scratch.join("history");
        let cache = scratch.join("cache");
        for dir in [scratch, &history, &cache] {
            fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        let config = scratch.join("config.ini");
        let env = vec![
            ("MAPILLARY_CONFIG_PATH", config.into_os_string()),
            ("MAPILLARY_UPLOAD_HISTORY_PATH", history.into_os_string()),
            ("MAPILLARY_TOOLS_UPLOAD_CACHE_DIR", cache.into_os_string()),
            ("MAPILLARY_TOOLS_PROMPT_DISABLED", "YES".into()),
            ("NO_PROXY", "127.0.0.1,localhost".into()),
            ("no_proxy", "127.0.0.1,localhost".into()),
            ("MAPILLARY_CLIENT_TOKEN", client_token.into()),
            (
                "MAPILLARY_GRAPH_API_ENDPOINT",
                endpoints.graph.trim_end_matches('/').into(),
            ),
            (
                "MAPILLARY_UPLOAD_ENDPOINT",
                endpoints.upload.trim_end_matches('/').into(),
            ),
            ("PYTHONUNBUFFERED", "1".into()),
        ];
        Ok(Self {
            program,
            scratch: scratch.to_path_buf(),
            env,
        })
    }

    /// `mapillary_tools authenticate --user_name relay --user_email <email> --user_password <password>`:
    /// mapillary_tools logs in (`POST {graph}/login` with the client token, §1.6) and stores the returned
    /// `access_token` as the profile's `user_upload_token` (with `MAPSettingsUserKey`), exactly as for a user
    /// who authenticates interactively. The password is passed on the command line, so use test accounts only.
    pub fn authenticate_with_password(&self, email: &str, password: &str) -> Result<RunOutput, ToolsError> {
        self.run_ok([
            "authenticate",
            "--user_name",
            PROFILE,
            "--user_email",
            email,
            "--user_password",
            password,
        ])
    }

    /// The `key = value` pairs of the [`PROFILE`] section of `config.ini` (empty when there is none).
    /// Holds the user upload token: never print the result.
    pub fn profile(&self) -> Result<Vec<(String, String)>, ToolsError> {
        let path = self.config_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let header = format!("[{PROFILE}]");
        let mut inside = false;
        let mut out = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                inside = line == header;
            } else if let (true, Some((k, v))) = (inside, line.split_once('=')) {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Ok(out)
    }

    /// `MAPILLARY_CONFIG_PATH`.
    pub fn config_path(&self) -> PathBuf {
        self.scratch.join("config.ini")
    }

    /// The scratch directory.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// `MAPILLARY_UPLOAD_HISTORY_PATH`.
    pub fn history_dir(&self) -> PathBuf {
        self.scratch.join("history")
    }

    /// A `Command` for `mapillary_tools <args>` with the runner's environment (for callers that need more).
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(&self.program);
        for k in CLEARED_ENV {
            cmd.env_remove(k);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs `mapillary_tools <args>` to completion and captures its output, whatever the exit code.
    pub fn run<I, S>(&self, args: I) -> Result<RunOutput, ToolsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_os_string()).collect();
        let started = Instant::now();
        let out = self.command(&args).output().map_err(|source| ToolsError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let run = RunOutput {
            args: args.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        };
        tracing::debug!(args = ?run.args, code = ?run.code, elapsed = ?run.elapsed, "mapillary_tools finished");
        Ok(run)
    }

    /// Like [`MapillaryTools::run`], but a non-zero exit is an error quoting the output tail.
    pub fn run_ok<I, S>(&self, args: I) -> Result<RunOutput, ToolsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let run = self.run(args)?;
        if run.success() {
            return Ok(run);
        }
        Err(ToolsError::Failed {
            args: run.args.join(" "),
            code: run
                .code
                .map_or_else(|| "a signal".to_string(), |c| format!("code {c}")),
            tail: run.tail(TAIL_LINES),
        })
    }

    /// `mapillary_tools process <import_dir> [extra…]`: writes [`DESCRIPTION_FILENAME`] into `import_dir`.
    pub fn process(&self, import_dir: &Path, extra: &[&str]) -> Result<RunOutput, ToolsError> {
        let mut args: Vec<OsString> = vec!["process".into(), import_dir.into()];
        args.extend(extra.iter().map(OsString::from));
        self.run_ok(args)
    }

    /// `mapillary_tools zip <import_dir> <zip_dir>`: one `mly_tools_<md5>.zip` per processed sequence.
    pub fn zip(&self, import_dir: &Path, zip_dir: &Path) -> Result<RunOutput, ToolsError> {
        fs::create_dir_all(zip_dir).map_err(io("creating", zip_dir))?;
        self.run_ok([OsString::from("zip"), import_dir.into(), zip_dir.into()])
    }

    /// `mapillary_tools [--verbose] upload <path> --user_name relay [--desc_path <file>] [extra…]`.
    ///
    /// With `verbose`, mapillary_tools logs every HTTP request (headers, with the token redacted) and reply to
    /// stderr.
    pub fn upload(
        &self,
        path: &Path,
        desc_path: Option<&Path>,
        verbose: bool,
        extra: &[&str],
    ) -> Result<RunOutput, ToolsError> {
        let mut args: Vec<OsString> = Vec::new();
        if verbose {
            args.push("--verbose".into());
        }
        args.extend(["upload".into(), path.into(), "--user_name".into(), PROFILE.into()]);
        if let Some(d) = desc_path {
            args.extend(["--desc_path".into(), d.into()]);
        }
        args.extend(extra.iter().map(OsString::from));
        self.run_ok(args)
    }

    /// The description file `process` wrote into `import_dir`.
    pub fn descriptions(&self, import_dir: &Path) -> Result<Vec<Description>, ToolsError> {
        read_descriptions(&import_dir.join(DESCRIPTION_FILENAME))
    }

    /// Every upload-history record (`<history>/<md5[0:2]>/<md5[2:]>.json`), sorted by path.
    pub fn history(&self) -> Result<Vec<HistoryRecord>, ToolsError> {
        let mut files = Vec::new();
        collect_json_files(&self.history_dir(), &mut files)?;
        files.sort();
        files
            .into_iter()
            .map(|path| {
                let raw = read_json(&path)?;
                let summary = raw.get("summary");
                let field = |k: &str| summary.and_then(|s| s.get(k)).and_then(id_string);
                Ok(HistoryRecord {
                    cluster_id: field("cluster_id"),
                    sequence_md5sum: field("sequence_md5sum"),
                    sequence_uuid: field("sequence_uuid"),
                    path,
                    raw,
                })
            })
            .collect()
    }
}

fn collect_json_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ToolsError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("listing", dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io("listing", dir))?.path();
        if path.is_dir() {
            collect_json_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exif_description_drops_file_keys_and_sequence_uuid() {
        let raw: Map<String, Value> = serde_json::from_str(
            r#"{"filename":"/x/IMG_0000.jpg","md5sum":"ab","filesize":12,"filetype":"image",
                "MAPSequenceUUID":"0","MAPLatitude":50.1,"MAPLongitude":-0.5,
                "MAPCaptureTime":"2024_05_01_10_00_00_000","MAPFilename":"IMG_0000.jpg"}"#,
        )
        .unwrap();
        let d = Description { raw };
        assert_eq!(d.file_name().as_deref(), Some("IMG_0000.jpg"));
        assert_eq!(d.sequence_uuid(), Some("0"));
        assert_eq!(
            d.exif_description(),
            serde_json::json!({"MAPLatitude":50.1,"MAPLongitude":-0.5,
                "MAPCaptureTime":"2024_05_01_10_00_00_000","MAPFilename":"IMG_0000.jpg"})
        );
    }

    #[test]
    fn missing_program_names_the_setup_command() {
        let dir = tempfile::tempdir().unwrap();
        let err = MapillaryTools::new(
            dir.path().join("nope"),
            dir.path(),
            &Endpoints {
                graph: "http://127.0.0.1:1/graph".into(),
                upload: "http://127.0.0.1:1/rupload".into(),
            },
            &Account {
                client_token: "c".into(),
                user_token: "u".into(),
                username: "n".into(),
                user_id: "1".into(),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("cargo xtask setup"), "{err}");
    }

    #[test]
    fn profile_reads_the_relay_section_as_authenticate_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let tools = MapillaryTools {
            program: PathBuf::from("/bin/true"),
            scratch: dir.path().to_path_buf(),
            env: Vec::new(),
        };
        assert_eq!(tools.profile().unwrap(), Vec::new(), "no config.ini yet");
        // configparser's layout: `key = value`, sections separated by blank lines.
        fs::write(
            tools.config_path(),
            "[other]\nuser_upload_token = nope\n\n[relay]\nuser_upload_token = MLYARabc\nMAPSettingsUserKey = 104\n\n",
        )
        .unwrap();
        assert_eq!(
            tools.profile().unwrap(),
            vec![
                ("user_upload_token".to_string(), "MLYARabc".to_string()),
                ("MAPSettingsUserKey".to_string(), "104".to_string()),
            ]
        );
    }

    #[test]
    fn history_records_are_found_and_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let tools = MapillaryTools {
            program: PathBuf::from("/bin/true"),
            scratch: dir.path().to_path_buf(),
            env: Vec::new(),
        };
        let sub = dir.path().join("history/ab");
        fs::create_dir_all(&sub).unwrap();
        fs::write(
            sub.join("cdef.json"),
            r#"{"params":{},"summary":{"cluster_id":"123","sequence_md5sum":"abcdef","sequence_uuid":"0"}}"#,
        )
        .unwrap();
        let h = tools.history().unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].cluster_id.as_deref(), Some("123"));
        assert_eq!(h[0].sequence_md5sum.as_deref(), Some("abcdef"));
        assert_eq!(h[0].sequence_uuid.as_deref(), Some("0"));
    }
}
