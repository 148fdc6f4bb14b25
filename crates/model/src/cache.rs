//! The KV cache of incremental decoding: per layer one buffer `[2, batch, kv_heads, max_len,
//! head_size]` (keys, then values), allocated at the first write and filled position by
//! position. Attention reads views of the filled part in place.
//!
//! A one-token step can instead take its position from a device tensor
//! ([`Cache::set_position`]): its kernels then read the position where they run, so the step
//! can be captured once and replayed at every later position ([`super::Decoder`]).

use super::rope::RopeTables;
use super::Llama;
use candle_core::{DType, Device, IndexOp, Result, Tensor};
use ops::{self, KvLayout, Position};

/// Per-layer key/value caches for incremental decoding.
#[derive(Debug, Clone)]
pub struct Cache {
    pub(crate) layers: Vec<LayerCache>,
}

/// The heads of a block's attention: query heads, kv heads, head size.
pub(crate) type Heads = (usize, usize, usize);

impl Cache {
    /// An empty cache for `model`, for up to `max_len` positions.
    pub fn new(model: &Llama, max_len: usize) -> Self {
        Self {
            layers: vec![LayerCache::new(max_len); model.layers.len()],
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |c| c.len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything cached (the buffers are kept for reuse).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|c| c.len = 0);
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.layers.first().map_or(0, |c| c.max_len)
    }

    /// Whether every layer's buffer exists (after the first write), so that its address no
    /// longer changes.
    pub fn is_allocated(&self) -> bool {
        self.layers.iter().all(|c| c.buffer.is_some())
    }

    /// Until set back to `None`, one-token steps write and attend at the position `position`
    /// holds (u32 `[1]` on the model's device) instead of at [`Cache::len`], and leave the
    /// length to the caller ([`Cache::advance`]).
    pub fn set_position(&mut self, position: Option<&Tensor>) {
        for c in &mut self.layers {
            c.position = position.cloned();
        }
    }

    /// Counts `n` more positions as cached: those device-positioned steps wrote.
    pub fn advance(&mut self, n: usize) -> Result<()> {
        for c in &mut self.layers {
            c.reserve(n)?;
            c.len += n;
        }
        Ok(())
    }

    /// Copies what `one`, the cache of a single sequence, holds into each of `rows` rows of
    /// this empty cache, in place (a buffer that already exists keeps its address): a prompt
    /// that every row shares runs once.
    pub fn fill_rows(&mut self, one: &Cache, rows: usize) -> Result<()> {
        if !self.is_empty() || one.layers.len() != self.layers.len() {
            candle_core::bail!(
                "the KV cache takes shared rows only when empty and of the same model ({} \
                 cached, {} layers for {})",
                self.len(),
                one.layers.len(),
                self.layers.len()
            );
        }
        self.layers
            .iter_mut()
            .zip(&one.layers)
            .try_for_each(|(c, o)| c.fill_rows(o, rows))
    }
}

/// The keys and values of one layer.
#[derive(Debug, Clone)]
pub struct LayerCache {
    buffer: Option<Tensor>,
    len: usize,
    max_len: usize,
    /// The device-held position of one-token steps, while [`Cache::set_position`] has one.
    position: Option<Tensor>,
    /// RoPE rows for all `max_len` positions, taken at the first device-positioned step.
    tables: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    fn new(max_len: usize) -> Self {
        Self {
            buffer: None,
            len: 0,
            max_len,
            position: None,
            tables: None,
        }
    }

    /// The buffer for `batch` × `kv_heads` × `head_size` entries, allocated on first use.
    fn buffer(
        &mut self,
        (batch, kv_heads, head_size): (usize, usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = [2, batch, kv_heads, self.max_len, head_size];
        match &self.buffer {
            Some(b) if b.dims() == shape && b.dtype() == dtype => Ok(b.clone()),
            Some(b) if self.len > 0 => candle_core::bail!(
                "the KV cache holds {:?} {:?} entries, not {shape:?} {dtype:?}",
                b.dims(),
                b.dtype()
            ),
            _ => {
                let b = Tensor::zeros(&shape[..], dtype, device)?;
                self.buffer = Some(b.clone());
                Ok(b)
            }
        }
    }

    /// Checks that `new` more positions fit.
    fn reserve(&self, new: usize) -> Result<()> {
        if self.len + new > self.max_len {
            candle_core::bail!(
                "the KV cache holds {} positions: {} cached, {new} more asked for",
                self.max_len,
                self.len
            );
        }
        Ok(())
    }

    /// [`Cache::fill_rows`] for one layer.
    fn fill_rows(&mut self, one: &LayerCache, rows: usize) -> Result<()> {
        let Some(source) = &one.buffer else {
            return Ok(());
        };
        let (two, batch, kv_heads, _, head_size) = source.dims5()?;
        if batch != 1 {
            candle_core::bail!("the KV cache fills its rows from one sequence, not {batch}");
        }
        self.reserve(one.len)?;
        let buffer = self.buffer((rows, kv_heads, head_size), source.dtype(), source.device())?;
        let shared = source.narrow(3, 0, one.len)?;
        let every_row = shared.broadcast_as((two, rows, kv_heads, one.len, head_size))?;
        buffer.slice_set(&every_row.contiguous()?, 3, 0)?;
        self.len = one.len;
        Ok(())
    }

    /// Keys and values of every cached position, `[b, kv_heads, len, head_size]` views each.
    fn views(&mut self, buffer: &Tensor, new: usize) -> Result<(Tensor, Tensor)> {
        self.len += new;
        Ok((
            buffer.i(0)?.narrow(2, 0, self.len)?,
            buffer.i(1)?.narrow(2, 0, self.len)?,
        ))
    }

    /// Appends keys and values `[b, kv_heads, t, head_size]` (already rotated); returns all.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.position.is_some() {
            candle_core::bail!("the KV cache takes a device-held position only from attend_packed");
        }
        let (b, kv_heads, t, d) = k.dims4()?;
        self.reserve(t)?;
        let buffer = self.buffer((b, kv_heads, d), k.dtype(), k.device())?;
        let both = Tensor::stack(&[k, v], 0)?;
        buffer.slice_set(&both, 3, self.len)?;
        self.views(&buffer, t)
    }

    /// Attention of a step over the cache from its packed projections `qkv`
    /// `[b, t, (heads + 2 kv_heads) · head_size]`: the keys (rotated by `rope`) and the values
    /// go into the cache and the rotated queries attend to every cached position up to theirs
    /// as `options` say ([`ops::cached_attention`]: one kernel for a one-position step on
    /// CUDA). Returns `[b, heads, t, head_size]`. Only where [`ops::write_kv_fused`] holds.
    pub fn attend_packed(
        &mut self,
        qkv: &Tensor,
        rope: &RopeTables,
        (heads, kv_heads, head_size): Heads,
        options: ops::AttentionOptions,
    ) -> Result<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        self.reserve(t)?;
        let buffer = self.buffer((b, kv_heads, head_size), qkv.dtype(), qkv.device())?;
        let layout = |at| KvLayout {
            heads,
            kv_heads,
            head_size,
            at,
        };
        if let Some(position) = self.position.clone() {
            let at = layout(Position::Device(&position));
            // Tables for every position the cache holds, kept here: a captured step holds
            // their addresses, so they must live as long as the cache, whatever the model's
            // tables do later.
            let (cos, sin) = match self.tables.clone() {
                Some(tables) => tables,
                None => {
                    let tables = rope.decoding_rows(self.max_len)?;
                    self.tables = Some(tables.clone());
                    tables
                }
            };
            return ops::cached_attention(&buffer, qkv, (&cos, &sin), at, options);
        }
        let (cos, sin) = rope.window(self.len, t)?;
        let at = layout(Position::Host(self.len));
        let out = ops::cached_attention(&buffer, qkv, (&cos, &sin), at, options)?;
        self.len += t;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn filled(shape: (usize, usize, usize, usize), value: f64) -> Tensor {
        (Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap() * value).unwrap()
    }

    #[test]
    fn appends_positions_and_refuses_more_than_it_holds() {
        let mut c = LayerCache::new(4);
        let (k, v) = c
            .append(&filled((1, 2, 3, 8), 1.0), &filled((1, 2, 3, 8), 2.0))
            .unwrap();
        assert_eq!(k.dims(), [1, 2, 3, 8]);
        let (k, v2) = c
            .append(&filled((1, 2, 1, 8), 3.0), &filled((1, 2, 1, 8), 4.0))
            .unwrap();
        assert_eq!(k.dims(), [1, 2, 4, 8]);
        let last = |t: &Tensor| t.narrow(2, 3, 1).unwrap().flatten_all().unwrap();
        assert_eq!(last(&k).to_vec1::<f32>().unwrap(), vec![3.0; 16]);
        assert_eq!(last(&v2).to_vec1::<f32>().unwrap(), vec![4.0; 16]);
        assert_eq!(
            v.narrow(2, 0, 3)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            96.0
        );
        let full = c.append(&filled((1, 2, 1, 8), 5.0), &filled((1, 2, 1, 8), 5.0));
        let message = full.unwrap_err().to_string();
        assert!(
            message.contains("holds 4 positions: 4 cached, 1 more"),
            "{message}"
        );
    }

    #[test]
    fn reset_reuses_the_buffer_and_a_new_shape_needs_an_empty_cache() {
        let mut c = LayerCache::new(4);
        c.append(&filled((1, 2, 2, 8), 1.0), &filled((1, 2, 2, 8), 1.0))
            .unwrap();
        let other = filled((2, 2, 1, 8), 1.0);
        let message = c.append(&other, &other).unwrap_err().to_string();
        assert!(message.contains("not [2, 2, 2, 4, 8]"), "{message}");
        c.len = 0;
        let (k, _) = c.append(&other, &other).unwrap();
        assert_eq!(k.dims(), [2, 2, 1, 8]);
    }
}
