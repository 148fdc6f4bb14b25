//! Finding a base model: a local directory, or a Hugging Face Hub id (`owner/name`) looked up
//! in the Hugging Face cache and downloaded into it when missing, unless `HF_HUB_OFFLINE` is
//! set. The cache is where `huggingface_hub` (and hf-hub) put it: `HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub` or `~/.cache/huggingface/hub`, laid out
//! as `huggingface-cli download` writes it: `models--owner--name/snapshots/<rev>/` with the
//! revision in `refs/main`.
//!
//! Downloads go through hf-hub's blocking client, which writes that layout and reads
//! `HF_ENDPOINT`, `HF_TOKEN` and the token `huggingface-cli login` saved. Finding the cache,
//! reading it, which files a model needs, and `HF_HUB_OFFLINE` stay here (see each function for
//! why hf-hub's own does not serve).

use super::io::weight_files;
use super::weights::ModelError;
use hf_hub::progress::{DownloadEvent, ProgressEvent, ProgressHandler};
use hf_hub::{HFClient, HFError};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// The directory holding the model `spec`: `spec` itself if it is a directory, otherwise the
/// cached snapshot of the hub model `spec`, downloaded first (config, tokenizer, weights and
/// every shard of a sharded checkpoint) when it is not complete in the cache.
pub fn resolve(spec: &str) -> Result<PathBuf, ModelError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !is_hub_id(spec) || looks_local(path) {
        return Err(ModelError::Hub(format!(
            "{spec}: no such model directory{}",
            match is_hub_id(spec) {
                true => " (read as a local path: its first folder exists here)",
                false => " (and not a Hugging Face Hub id like owner/name)",
            }
        )));
    }
    let cache_dir = cache_dir()?;
    let repo_dir = cache_dir.join(format!("models--{}", spec.replace('/', "--")));
    match snapshot(|file| Ok(cached(&repo_dir, file))) {
        Err(ModelError::Missing { path, .. }) if offline() => Err(ModelError::Hub(format!(
            "{spec} is not a local directory, and the Hugging Face cache at {} lacks its {} while HF_HUB_OFFLINE is set: run `huggingface-cli download {spec}` where there is network access, or set HF_HUB_OFFLINE=0",
            cache_dir.display(),
            path.display()
        ))),
        Err(ModelError::Missing { .. }) => download(spec, cache_dir),
        found => found,
    }
}

/// Whether `spec` looks like a hub id: `name` or `owner/name` of letters, digits, `-_.`.
fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Whether a spec that could be a hub id is a mistyped local path instead: `runs/modle` where
/// `runs/` exists. A hub owner's name is rarely also a folder where the command runs.
fn looks_local(path: &Path) -> bool {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .is_some_and(Path::is_dir)
}

/// Whether `HF_HUB_OFFLINE` asks for the cache only, read as `huggingface_hub` reads it
/// (hf-hub does not read it).
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| ["1", "true", "yes", "on"].contains(&v.to_ascii_lowercase().as_str()))
}

/// The hub cache directory, found the way `huggingface_hub` and hf-hub 1.0 find it. Empty
/// variables count as unset. hf-hub's `resolve_cache_dir` is hidden from its documentation (not
/// a stable API), and `HFClient::cache_dir` needs a client, which offline use must not (see
/// [`cached`]).
fn cache_dir() -> Result<PathBuf, ModelError> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Ok(dir.into());
    }
    let home = var("HF_HOME").map(PathBuf::from).or_else(|| {
        let cache = var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
        Some(cache.join("huggingface"))
    });
    home.map(|home| home.join("hub")).ok_or_else(|| {
        ModelError::Hub("cannot locate the Hugging Face cache: set HF_HOME or HF_HUB_CACHE".into())
    })
}

/// The cached copy of `file` in `repo_dir` (a model's folder of the cache), at the revision in
/// `refs/main`, as `huggingface_hub`'s `try_to_load_from_cache` finds it; `None` when the cache
/// lacks it.
///
/// hf-hub 1.0 has this lookup (`download_file` with `local_files_only`), but only on a client
/// whose HTTP stack loads the system's CA certificates as it is built, and fails where there
/// are none (a slim container): the cache alone must do offline, as it did with hf-hub 0.4.
fn cached(repo_dir: &Path, file: &str) -> Option<PathBuf> {
    let commit = std::fs::read_to_string(repo_dir.join("refs/main")).ok()?;
    let path = repo_dir
        .join("snapshots")
        .join(Some(commit.trim()).filter(|c| !c.is_empty())?)
        .join(file);
    path.exists().then_some(path)
}

/// Fetches the files of a model through `get` (which returns `None` for a file the source
/// does not have) and returns the directory they are in. A required file that is missing
/// gives [`ModelError::Missing`] with its name.
///
/// hf-hub has no equivalent: its `snapshot_download` with `local_files_only` returns a
/// snapshot directory without checking which files it holds (an interrupted download would
/// pass), and online it fetches the whole repository or the files matching globs, where a
/// model needs the shards its index names and no more (Mistral repositories also hold
/// `consolidated.safetensors`, a second copy of the weights).
fn snapshot(
    mut get: impl FnMut(&str) -> Result<Option<PathBuf>, ModelError>,
) -> Result<PathBuf, ModelError> {
    let need = |get: &mut dyn FnMut(&str) -> Result<Option<PathBuf>, ModelError>, file: &str| {
        get(file)?.ok_or_else(|| ModelError::Missing {
            path: file.into(),
            what: "a file the model needs".into(),
        })
    };
    let config = need(&mut get, "config.json")?;
    need(&mut get, "tokenizer.json")?;
    if get("model.safetensors")?.is_none() {
        let index = need(&mut get, "model.safetensors.index.json")?;
        let dir = index.parent().unwrap_or(Path::new("."));
        for shard in weight_files(dir)? {
            need(&mut get, &shard_name(&index, dir, &shard)?)?;
        }
    }
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        get(optional)?;
    }
    Ok(config.parent().unwrap_or(Path::new(".")).to_path_buf())
}

/// The name in the repository of `shard`, a file the index at `index` (in `dir`) names. The
/// index comes from the hub, so a name that would leave the snapshot (`../x`, `/x`) is refused
/// rather than looked up or downloaded.
fn shard_name(index: &Path, dir: &Path, shard: &Path) -> Result<String, ModelError> {
    shard
        .strip_prefix(dir)
        .ok()
        .filter(|name| name.components().all(|c| matches!(c, Component::Normal(_))))
        .map(|name| name.to_string_lossy().into_owned())
        .ok_or_else(|| ModelError::Config {
            path: index.to_path_buf(),
            message: format!(
                "weight_map: {} is not a file beside the index",
                shard.display()
            ),
        })
}

/// Downloads the model `spec` into the cache at `cache_dir` and returns its snapshot.
fn download(spec: &str, cache_dir: PathBuf) -> Result<PathBuf, ModelError> {
    let failed = |what: String, e: HFError| {
        ModelError::Hub(format!(
            "{spec} is not a local directory, and {what} the Hugging Face Hub failed: {}; check the id and the network (or run `huggingface-cli download {spec}`)",
            with_sources(&e)
        ))
    };
    let (owner, name) = hf_hub::split_id(spec);
    let repo = HFClient::builder()
        .cache_dir(cache_dir)
        .build_sync()
        .map_err(|e| failed("setting up a connection to".into(), e))?
        .model(owner, name);
    let info = repo
        .info()
        .send()
        .map_err(|e| failed("listing its files on".into(), e))?;
    let files: HashSet<String> = info
        .siblings
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.rfilename)
        .collect();
    let found = snapshot(|file| {
        if !files.contains(file) {
            return Ok(None);
        }
        repo.download_file()
            .filename(file)
            .progress(FileBar::new(file))
            .send()
            .map(Some)
            .map_err(|e| failed(format!("downloading {file} from"), e))
    });
    match found {
        Err(ModelError::Missing { path, .. }) => Err(ModelError::Hub(format!(
            "{spec} on the Hugging Face Hub has no {}, which the model needs (a model directory in Hugging Face format with safetensors weights)",
            path.display()
        ))),
        other => other,
    }
}

/// `e` and the errors under it: hf-hub's transport errors say what went wrong only there
/// (`builder error` over `No CA certificates were loaded from the system`).
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// A file download's progress bar on stderr, hidden when stderr is not a terminal. It is drawn
/// at hf-hub's first event with the file's size, so a file the hub says is unchanged since it
/// was cached draws nothing.
struct FileBar {
    file: String,
    bar: OnceLock<ProgressBar>,
}

impl FileBar {
    fn new(file: &str) -> Self {
        Self {
            file: file.into(),
            bar: OnceLock::new(),
        }
    }

    fn start(&self, len: u64) -> &ProgressBar {
        self.bar.get_or_init(|| {
            let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
            let template =
                "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}) {msg}";
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar.set_message(self.file.clone());
            bar
        })
    }
}

impl ProgressHandler for FileBar {
    fn on_progress(&self, event: &ProgressEvent) {
        let ProgressEvent::Download(event) = event else {
            return;
        };
        match event {
            DownloadEvent::Start { total_bytes, .. } => {
                self.start(*total_bytes).set_length(*total_bytes)
            }
            // Plain downloads report the file's bytes, Xet-stored files the batch's.
            DownloadEvent::Progress { files } => {
                for file in files.iter().filter(|f| f.filename == self.file) {
                    if let Some(bar) = self.bar.get() {
                        bar.set_position(file.bytes_completed);
                    }
                }
            }
            DownloadEvent::AggregateProgress {
                bytes_completed, ..
            } => {
                if let Some(bar) = self.bar.get() {
                    bar.set_position(*bytes_completed);
                }
            }
            DownloadEvent::Complete => {
                if let Some(bar) = self.bar.get() {
                    bar.finish();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M"));
        assert!(is_hub_id("gpt2"));
        assert!(!is_hub_id("runs/small/model"));
        assert!(!is_hub_id("./model"));
        assert!(!is_hub_id("/abs/model"));
        assert!(!is_hub_id("../model"));
    }

    #[test]
    fn snapshot_fetches_every_shard_of_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        let mut asked = Vec::new();
        let got = snapshot(|file| {
            asked.push(file.to_string());
            Ok((file != "model.safetensors").then(|| dir.path().join(file)))
        })
        .unwrap();
        assert_eq!(got, dir.path());
        for shard in [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ] {
            assert!(
                asked.iter().any(|a| a == shard),
                "{shard} not fetched: {asked:?}"
            );
        }
    }

    #[test]
    fn snapshot_refuses_an_index_naming_files_outside_it() {
        for outside in ["../model.safetensors", "/etc/passwd"] {
            let dir = tempfile::tempdir().unwrap();
            let index = format!(r#"{{"weight_map": {{"a": "{outside}"}}}}"#);
            std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
            let mut asked = Vec::new();
            let got = snapshot(|file| {
                asked.push(file.to_string());
                Ok((file != "model.safetensors").then(|| dir.path().join(file)))
            });
            assert!(
                matches!(got, Err(ModelError::Config { .. })),
                "{outside}: {got:?}"
            );
            assert!(!asked.iter().any(|a| a == outside), "{outside} fetched");
        }
    }
}
