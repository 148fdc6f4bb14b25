//! Finding a base model: a local directory, or a Hugging Face Hub id (`owner/name`) looked up
//! in the Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`) and downloaded into it when missing, unless `HF_HUB_OFFLINE` is
//! set. The cache layout is the one `huggingface-cli download` writes:
//! `models--owner--name/snapshots/<rev>/` with the revision in `refs/main`.

use super::io::weight_files;
use super::weights::ModelError;
use hf_hub::api::sync::ApiBuilder;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

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
    let cached = hf_hub::Cache::new(cache_dir.clone()).model(spec.to_string());
    match snapshot(|file| Ok(cached.get(file))) {
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

/// Whether `HF_HUB_OFFLINE` asks for the cache only.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| ["1", "true", "yes", "on"].contains(&v.to_ascii_lowercase().as_str()))
}

/// The hub cache directory, found the way `huggingface_hub` finds it.
fn cache_dir() -> Result<PathBuf, ModelError> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Ok(dir.into());
    }
    if let Some(home) = var("HF_HOME") {
        return Ok(PathBuf::from(home).join("hub"));
    }
    var("HOME")
        .map(|home| PathBuf::from(home).join(".cache/huggingface/hub"))
        .ok_or_else(|| {
            ModelError::Hub(
                "cannot locate the Hugging Face cache: set HF_HOME or HF_HUB_CACHE".into(),
            )
        })
}

/// Fetches the files of a model through `get` (which returns `None` for a file the source
/// does not have) and returns the directory they are in. A required file that is missing
/// gives [`ModelError::Missing`] with its name.
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
            let name = shard.strip_prefix(dir).unwrap_or(&shard);
            need(&mut get, &name.to_string_lossy())?;
        }
    }
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        get(optional)?;
    }
    Ok(config.parent().unwrap_or(Path::new(".")).to_path_buf())
}

/// Downloads the model `spec` into the cache at `cache_dir` and returns its snapshot.
fn download(spec: &str, cache_dir: PathBuf) -> Result<PathBuf, ModelError> {
    let failed = |what: String, e: hf_hub::api::sync::ApiError| {
        ModelError::Hub(format!(
            "{spec} is not a local directory, and {what} from the Hugging Face Hub failed: {e}; check the id and the network (or run `huggingface-cli download {spec}`)"
        ))
    };
    let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir)).with_progress(true);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    // Gated models (Llama) need a token: HF_TOKEN wins over the one `huggingface-cli login` saved.
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .map_err(|e| failed("connecting".into(), e))?;
    let repo = api.model(spec.to_string());
    let info = repo
        .info()
        .map_err(|e| failed("listing its files".into(), e))?;
    let files: HashSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    snapshot(|file| {
        if !files.contains(file) {
            return Ok(None);
        }
        repo.get(file)
            .map(Some)
            .map_err(|e| failed(format!("downloading {file}"), e))
    })
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
}
