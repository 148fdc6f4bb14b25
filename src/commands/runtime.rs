//! Loading what `eval` and `generate` run: device, config defaults, model and adapter.

use crate::cli::RuntimeArgs;
use anyhow::{Context, Result};
use candle_core::Device;
use config::Config;
use model::quantized::WeightStorage;
use model::LoadedModel;
use std::path::Path;
use train::Adapter;

/// The opened device and the config whose sections give defaults.
pub struct Runtime {
    pub device: Device,
    pub config: Config,
}

impl Runtime {
    /// Opens the device and reads `--config` (defaults when absent).
    pub fn open(args: &RuntimeArgs) -> Result<Self> {
        let device = ops::device::open(args.device)?;
        let config = match &args.config {
            Some(path) => super::config::load_file(path, &[])?,
            None => Config::default(),
        };
        Ok(Self { device, config })
    }
}

/// Loads the model at `spec` (a directory or hub id) and attaches `adapter` if given.
pub fn load_model(
    spec: &Path,
    adapter: Option<&Path>,
    args: &RuntimeArgs,
    device: &Device,
) -> Result<LoadedModel> {
    let dtype = args.dtype.dtype();
    let dir = model::hub::resolve(&spec.to_string_lossy())?;
    let storage = match args.nf4 {
        true => WeightStorage::Nf4(dtype),
        false => WeightStorage::Dense(dtype),
    };
    let mut loaded = model::io::load_as(&dir, storage, dtype, device)
        .with_context(|| format!("cannot load the model {}", spec.display()))?;
    if let Some(adapter_dir) = adapter {
        let adapter = Adapter::load(adapter_dir, &loaded.model.config, dtype, device)
            .with_context(|| format!("cannot load the adapter {}", adapter_dir.display()))?;
        adapter.attach(&mut loaded.model).with_context(|| {
            format!(
                "the adapter {} does not fit the model {}",
                adapter_dir.display(),
                spec.display()
            )
        })?;
    }
    Ok(loaded)
}
