//! The KV cache of incremental decoding: per layer one buffer `[2, batch, kv_heads, slots,
//! head_size]` (keys, then values), allocated at the first write and filled position by
//! position. Attention reads views of the filled part in place.
//!
//! A layer of global attention holds a slot for every position the sequence may reach, in a
//! buffer that starts with [`FIRST_SLOTS`] (or as many as the first write needs) and doubles
//! when it fills (`LayerCache::grown`), so a session that may reach the model's whole context
//! (`generate --interactive`) holds only what it has reached. A
//! sliding-window layer (Gemma 2/3, Phi-3, Qwen with `use_sliding_window`) needs only the last
//! `window - 1` positions before the one it decodes, so it holds fewer slots (that many plus
//! half as many again, [`window_slots`]) and, when they are full, moves the positions it still
//! needs to the front of its buffer and drops the others (`LayerCache::compact`); a chunk of
//! more new positions than it has room for attends through a buffer of its own. Slot `s` then
//! holds position `dropped + s`. Keys are cached rotated, and masks depend only on the
//! distance between positions, so attention works in slots as it did in positions; only
//! RoPE needs the positions themselves.
//!
//! A one-token step can instead take its position from a device tensor
//! ([`Cache::set_position`]): its kernels then read the position where they run, so the step
//! can be captured once and replayed at every later position ([`super::Decoder`]), until a
//! buffer grows or a window layer drops positions ([`Cache::version`]).

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

/// The slots a buffer starts with, unless its first write needs more or the layer never holds
/// as many: a sequence of up to this many positions allocates its cache once.
pub const FIRST_SLOTS: usize = 4096;

/// The slots a layer attending to `window` positions (its own included) holds for a sequence
/// of up to `capacity` positions: the `window - 1` before the decoded one, and half as many
/// again (at least 16), so that it moves them to the front once every so many positions.
pub fn window_slots(window: usize, capacity: usize) -> usize {
    let keep = window.saturating_sub(1);
    (keep + (keep / 2).max(16)).min(capacity)
}

impl Cache {
    /// An empty cache for `model`, for up to `max_len` positions.
    pub fn new(model: &Llama, max_len: usize) -> Self {
        Self::with_first_slots(model, max_len, FIRST_SLOTS)
    }

    /// [`Cache::new`] whose buffers start with `first_slots` slots.
    pub(crate) fn with_first_slots(model: &Llama, max_len: usize, first_slots: usize) -> Self {
        let layers = model.family.layers.iter();
        let layer = |window| LayerCache::new(max_len, window, first_slots);
        Self {
            layers: layers.map(|l| layer(l.window)).collect(),
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
        self.layers.iter_mut().for_each(|c| {
            if c.dropped > 0 {
                c.version += 1;
            }
            c.len = 0;
            c.dropped = 0;
        });
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.layers.first().map_or(0, |c| c.capacity)
    }

    /// Positions the sliding-window layers have dropped from the front of their buffers (0
    /// without such layers): their slot `s` holds position `dropped + s`. The model's window
    /// layers share one window, so they drop together.
    pub fn dropped(&self) -> usize {
        self.layers.iter().map(|c| c.dropped).max().unwrap_or(0)
    }

    /// How many times a buffer has moved or grown or a window layer has dropped positions: a
    /// step captured at one version reads stale addresses or RoPE rows at another.
    pub fn version(&self) -> usize {
        self.layers.iter().map(|c| c.version).sum()
    }

    /// The positions each layer's buffer has room for (0 before its first write).
    #[cfg(test)]
    pub(crate) fn buffer_slots(&self) -> Vec<usize> {
        self.layers.iter().map(LayerCache::slots).collect()
    }

    /// Whether every layer's buffer exists (after the first write).
    pub fn is_allocated(&self) -> bool {
        self.layers.iter().all(|c| c.buffer.is_some())
    }

    /// Makes room for `new` more positions in every layer: buffers grow, and window layers
    /// drop the positions no later one attends to, where they must ([`Cache::version`] then
    /// changes). Fails where the capacity would be passed.
    pub fn make_room(&mut self, new: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|c| c.make_room(new))
    }

    /// Until set back to `None`, one-token steps write and attend at the position `position`
    /// holds instead of at [`Cache::len`], and leave the length to the caller
    /// ([`Cache::advance`]): u32 `[2]` on the model's device, the position, then its slot in
    /// the window layers (the position less [`Cache::dropped`]).
    pub fn set_position(&mut self, position: Option<&Tensor>) -> Result<()> {
        for c in &mut self.layers {
            c.position = match position {
                Some(p) => Some(p.narrow(0, usize::from(c.keep.is_some()), 1)?),
                None => None,
            };
        }
        Ok(())
    }

    /// Counts `n` more positions as cached: those device-positioned steps wrote (after
    /// [`Cache::make_room`]).
    pub fn advance(&mut self, n: usize) -> Result<()> {
        for c in &mut self.layers {
            c.reserve(n)?;
            c.len += n;
        }
        Ok(())
    }

    /// Takes the last `n` cached positions back out (steps whose tokens were not wanted):
    /// the steps that follow write their slots again. A window layer keeps what the next
    /// step attends to, as it did for the positions taken out.
    pub fn retract(&mut self, n: usize) -> Result<()> {
        if let Some(c) = self.layers.iter().find(|c| c.len - c.dropped < n) {
            candle_core::bail!(
                "the KV cache holds {} positions here, not the {n} to take back",
                c.len - c.dropped
            );
        }
        self.layers.iter_mut().for_each(|c| c.len -= n);
        Ok(())
    }

    /// Copies what `one`, the cache of a single sequence, holds into each of `rows` rows of
    /// this empty cache, in place (a buffer that already exists and has room keeps its
    /// address): a prompt that every row shares runs once.
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
    /// Positions cached (of the whole sequence, dropped ones included).
    len: usize,
    /// Positions the sequence may reach.
    capacity: usize,
    /// The most slots the buffer grows to: `capacity`, or fewer for a window layer.
    room: usize,
    /// The slots the buffer starts with (at most `room`).
    first_slots: usize,
    /// A window layer's positions before the decoded one that later ones may attend to
    /// (`window - 1`): the ones it keeps when it drops the others.
    keep: Option<usize>,
    /// Positions dropped from the front of the buffer: slot `s` holds position `dropped + s`.
    dropped: usize,
    /// The device-held slot of one-token steps, while [`Cache::set_position`] has one.
    position: Option<Tensor>,
    /// Changes a captured step would miss: the buffer moved or grew, positions were dropped.
    version: usize,
    /// RoPE rows for the slots (those of positions `dropped..`), taken at the first
    /// device-positioned step of a version, with that version.
    tables: Option<(usize, Tensor, Tensor)>,
}

impl LayerCache {
    fn new(capacity: usize, window: Option<usize>, first_slots: usize) -> Self {
        let keep = window.map(|w| w.saturating_sub(1));
        let room = window.map_or(capacity, |w| window_slots(w, capacity));
        Self {
            buffer: None,
            len: 0,
            capacity,
            room,
            first_slots: first_slots.clamp(1, room.max(1)),
            // A window that covers every slot never drops a position.
            keep: keep.filter(|_| room < capacity),
            dropped: 0,
            position: None,
            version: 0,
            tables: None,
        }
    }

    /// The slots of the buffer (0 before the first write).
    fn slots(&self) -> usize {
        self.buffer.as_ref().map_or(0, |b| b.dims()[3])
    }

    /// Positions the buffer holds now.
    fn held(&self) -> usize {
        self.len - self.dropped
    }

    /// A copy of the `n` slots of `buffer` that end at slot `end`. A narrowed slot range is
    /// never contiguous (keys and values lie before it), so this copies: the result can be
    /// written into the buffer it came from.
    fn slots_before(buffer: &Tensor, end: usize, n: usize) -> Result<Tensor> {
        buffer.narrow(3, end - n, n)?.contiguous()
    }

    /// The buffer for `batch` × `kv_heads` × `head_size` entries with at least `need` slots,
    /// allocated on first use (with [`LayerCache::first_slots`], or `need` if more) and grown
    /// where it has fewer ([`LayerCache::grown`]).
    fn buffer(
        &mut self,
        (batch, kv_heads, head_size): (usize, usize, usize),
        dtype: DType,
        device: &Device,
        need: usize,
    ) -> Result<Tensor> {
        let entries = [2, batch, kv_heads, head_size];
        let fits = |b: &Tensor| {
            let d = b.dims();
            [d[0], d[1], d[2], d[4]] == entries && b.dtype() == dtype
        };
        match self.buffer.clone() {
            Some(b) if fits(&b) => self.grown(b, need),
            Some(b) if self.len > 0 => candle_core::bail!(
                "the KV cache holds {:?} {:?} entries, not {entries:?} {dtype:?} (keys and \
                 values, batch, kv heads, head size)",
                b.dims(),
                b.dtype()
            ),
            _ => {
                let slots = self.first_slots.max(need).min(self.room);
                let b = Tensor::zeros((2, batch, kv_heads, slots, head_size), dtype, device)?;
                self.buffer = Some(b.clone());
                self.version += 1;
                Ok(b)
            }
        }
    }

    /// The buffer `old` (this layer's) grown to at least `need` slots, to twice its slots or
    /// more (at most [`LayerCache::room`]), the positions held copied over; `old` itself where
    /// it has them.
    fn grown(&mut self, old: Tensor, need: usize) -> Result<Tensor> {
        let (two, batch, kv_heads, slots, head_size) = old.dims5()?;
        if slots >= need {
            return Ok(old);
        }
        let grown = need.max(2 * slots).min(self.room);
        let new = Tensor::zeros(
            (two, batch, kv_heads, grown, head_size),
            old.dtype(),
            old.device(),
        )?;
        if self.held() > 0 {
            new.slice_set(&old.narrow(3, 0, self.held())?.contiguous()?, 3, 0)?;
        }
        self.buffer = Some(new.clone());
        self.version += 1;
        Ok(new)
    }

    /// Checks that `new` more positions fit, in the sequence and in the buffer as it is.
    fn reserve(&self, new: usize) -> Result<()> {
        self.reserve_in_sequence(new)?;
        if self.held() + new > self.slots() {
            candle_core::bail!(
                "the KV cache's buffer has {} slots: {} held, {new} more asked for (room is \
                 made first)",
                self.slots(),
                self.held()
            );
        }
        Ok(())
    }

    /// Checks that `new` more positions fit in the sequence.
    fn reserve_in_sequence(&self, new: usize) -> Result<()> {
        if self.len + new > self.capacity {
            candle_core::bail!(
                "the KV cache holds {} positions: {} cached, {new} more asked for",
                self.capacity,
                self.len
            );
        }
        Ok(())
    }

    /// Makes room for `new` more positions: a window layer that would pass its room drops
    /// what no later position attends to, where that leaves room ([`LayerCache::compact`]),
    /// and a buffer with too few slots grows ([`LayerCache::grown`]).
    fn make_room(&mut self, new: usize) -> Result<()> {
        if let Some(keep) = self.keep {
            if self.held() + new > self.room && keep + new <= self.room {
                self.compact(keep)?;
            }
        }
        self.reserve_in_sequence(new)?;
        if self.held() + new > self.room {
            candle_core::bail!(
                "the KV cache's window layer has room for {} positions: {} held, {new} more \
                 asked for",
                self.room,
                self.held()
            );
        }
        if let Some(buffer) = self.buffer.clone() {
            self.grown(buffer, self.held() + new)?;
        }
        Ok(())
    }

    /// Moves the last `keep` positions held (all, if fewer) to the front of the buffer and
    /// drops the others.
    fn compact(&mut self, keep: usize) -> Result<()> {
        let kept = self.held().min(keep);
        if let Some(buffer) = self.buffer.as_ref().filter(|_| kept > 0) {
            buffer.slice_set(&Self::slots_before(buffer, self.held(), kept)?, 3, 0)?;
        }
        self.dropped = self.len - kept;
        self.version += 1;
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
        if one.len > self.capacity || one.held() > self.room {
            candle_core::bail!(
                "the KV cache holds {} positions in {} slots, not {} in {}",
                self.capacity,
                self.room,
                one.len,
                one.held()
            );
        }
        let held = one.held();
        let (dtype, device) = (source.dtype(), source.device());
        let buffer = self.buffer((rows, kv_heads, head_size), dtype, device, held)?;
        let shared = source.narrow(3, 0, held)?;
        let every_row = shared.broadcast_as((two, rows, kv_heads, held, head_size))?;
        buffer.slice_set(&every_row.contiguous()?, 3, 0)?;
        if one.dropped > 0 {
            self.version += 1;
        }
        (self.len, self.dropped) = (one.len, one.dropped);
        Ok(())
    }

    /// Keys and values of every held position, `[b, kv_heads, held, head_size]` views each.
    fn views(&mut self, buffer: &Tensor, new: usize) -> Result<(Tensor, Tensor)> {
        self.len += new;
        let held = self.held();
        Ok((
            buffer.i(0)?.narrow(2, 0, held)?,
            buffer.i(1)?.narrow(2, 0, held)?,
        ))
    }

    /// The positions a window layer keeps (at most `keep`) followed by `new` ones: a buffer
    /// `[2, b, kv_heads, kept + new, head_size]` holding the kept ones, for a step of more new
    /// positions than the layer has room for, and how many it kept.
    fn widened(&self, buffer: &Tensor, keep: usize, new: usize) -> Result<(Tensor, usize)> {
        let (two, b, kv_heads, _, d) = buffer.dims5()?;
        let kept = self.held().min(keep);
        let wide = Tensor::zeros(
            (two, b, kv_heads, kept + new, d),
            buffer.dtype(),
            buffer.device(),
        )?;
        if kept > 0 {
            wide.slice_set(&Self::slots_before(buffer, self.held(), kept)?, 3, 0)?;
        }
        Ok((wide, kept))
    }

    /// After a step of `new` positions through `wide` (from [`LayerCache::widened`], holding
    /// `kept + new` positions): its last `keep` positions (all, if fewer) become the buffer's.
    fn keep_last(&mut self, buffer: &Tensor, wide: &Tensor, keep: usize, new: usize) -> Result<()> {
        let total = wide.dim(3)?;
        let kept = total.min(keep);
        if kept > 0 {
            buffer.slice_set(&Self::slots_before(wide, total, kept)?, 3, 0)?;
        }
        self.len += new;
        self.dropped = self.len - kept;
        self.version += 1;
        Ok(())
    }

    /// How a step of `new` positions writes: into a buffer of its own (`Some(keep)`,
    /// [`LayerCache::widened`]) where a window layer has no room for them even after dropping
    /// what it need not keep, else in place after making room; and the slots the layer's
    /// buffer needs for it.
    fn room_for(&mut self, new: usize) -> Result<(Option<usize>, usize)> {
        match self.keep {
            Some(keep) if self.held() + new > self.room && keep + new > self.room => {
                self.reserve_in_sequence(new)?;
                Ok((Some(keep), keep.min(self.held() + new)))
            }
            _ => {
                self.make_room(new)?;
                Ok((None, self.held() + new))
            }
        }
    }

    /// Appends keys and values `[b, kv_heads, t, head_size]` (already rotated); returns all
    /// the step attends to (a window layer's kept positions and the new ones).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.position.is_some() {
            candle_core::bail!("the KV cache takes a device-held position only from attend_packed");
        }
        let (b, kv_heads, t, d) = k.dims4()?;
        let (wide, need) = self.room_for(t)?;
        let buffer = self.buffer((b, kv_heads, d), k.dtype(), k.device(), need)?;
        let both = Tensor::stack(&[k, v], 0)?;
        if let Some(keep) = wide {
            let (wide, kept) = self.widened(&buffer, keep, t)?;
            wide.slice_set(&both, 3, kept)?;
            self.keep_last(&buffer, &wide, keep, t)?;
            return Ok((wide.i(0)?, wide.i(1)?));
        }
        buffer.slice_set(&both, 3, self.held())?;
        self.views(&buffer, t)
    }

    /// Attention of a step over the cache from its packed projections `qkv`
    /// `[b, t, (heads + 2 kv_heads) · head_size]`: the keys (rotated by `rope`) and the values
    /// go into the cache and the rotated queries attend to every cached position up to theirs
    /// as `options` say ([`ops::cached_attention`]: one kernel for a one-position step on
    /// CUDA). Returns `[b, heads, t, head_size]`. Only where [`ops::write_kv_fused`] holds.
    /// A device-positioned step expects room made ([`Cache::make_room`]).
    pub fn attend_packed(
        &mut self,
        qkv: &Tensor,
        rope: &RopeTables,
        (heads, kv_heads, head_size): Heads,
        options: ops::AttentionOptions,
    ) -> Result<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        let layout = |at| KvLayout {
            heads,
            kv_heads,
            head_size,
            at,
        };
        if let Some(position) = self.position.clone() {
            let need = self.held() + t;
            let buffer = self.buffer((b, kv_heads, head_size), qkv.dtype(), qkv.device(), need)?;
            self.reserve(t)?;
            let at = layout(Position::Device(&position));
            let (cos, sin) = self.slot_tables(rope)?;
            return ops::cached_attention(&buffer, qkv, (&cos, &sin), at, options);
        }
        let (wide, need) = self.room_for(t)?;
        let buffer = self.buffer((b, kv_heads, head_size), qkv.dtype(), qkv.device(), need)?;
        let (cos, sin) = rope.window(self.len, t)?;
        if let Some(keep) = wide {
            let (wide, kept) = self.widened(&buffer, keep, t)?;
            let at = layout(Position::Host(kept));
            let out = ops::cached_attention(&wide, qkv, (&cos, &sin), at, options)?;
            self.keep_last(&buffer, &wide, keep, t)?;
            return Ok(out);
        }
        let at = layout(Position::Host(self.held()));
        let out = ops::cached_attention(&buffer, qkv, (&cos, &sin), at, options)?;
        self.len += t;
        Ok(out)
    }

    /// RoPE rows for every slot (those of positions `dropped..dropped + slots`, zero rows
    /// past the model's tables, which no step reaches), kept here until the version changes:
    /// a captured step holds their addresses, so they must live as long as it is replayed,
    /// whatever the model's tables do later.
    fn slot_tables(&mut self, rope: &RopeTables) -> Result<(Tensor, Tensor)> {
        if let Some((version, cos, sin)) = &self.tables {
            if *version == self.version {
                return Ok((cos.clone(), sin.clone()));
            }
        }
        let (cos, sin) = rope.decoding_rows(self.capacity)?;
        let (from, rows) = (self.dropped.min(self.capacity), self.slots());
        let slot_rows = |table: Tensor| -> Result<Tensor> {
            let there = (self.capacity - from).min(rows);
            let rows_there = table.narrow(0, from, there)?;
            if there == rows {
                return Ok(rows_there);
            }
            let width = table.dim(1)?;
            let past = Tensor::zeros((rows - there, width), table.dtype(), table.device())?;
            Tensor::cat(&[&rows_there, &past], 0)
        };
        let (cos, sin) = (slot_rows(cos)?, slot_rows(sin)?);
        self.tables = Some((self.version, cos.clone(), sin.clone()));
        Ok((cos, sin))
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
        let mut c = LayerCache::new(4, None, 4);
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
        let mut c = LayerCache::new(4, None, 4);
        c.append(&filled((1, 2, 2, 8), 1.0), &filled((1, 2, 2, 8), 1.0))
            .unwrap();
        let other = filled((2, 2, 1, 8), 1.0);
        let message = c.append(&other, &other).unwrap_err().to_string();
        assert!(message.contains("not [2, 2, 2, 8]"), "{message}");
        c.len = 0;
        let (k, _) = c.append(&other, &other).unwrap();
        assert_eq!(k.dims(), [2, 2, 1, 8]);
    }

    /// Keys whose every element is its position, `[1, 1, t, 2]` from position `from`.
    fn positions(from: usize, t: usize) -> Tensor {
        let values: Vec<f32> = (from..from + t).flat_map(|p| [p as f32; 2]).collect();
        Tensor::from_vec(values, (1, 1, t, 2), &Device::Cpu).unwrap()
    }

    /// The positions the keys `[1, 1, n, 2]` hold, in order.
    fn held(keys: &Tensor) -> Vec<usize> {
        let values = keys.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values.iter().step_by(2).map(|&v| v as usize).collect()
    }

    /// Appends `t` positions from `from` as keys and values; the positions the step sees.
    fn append(c: &mut LayerCache, from: usize, t: usize) -> Vec<usize> {
        let k = positions(from, t);
        let (k, v) = c.append(&k, &k).unwrap();
        assert_eq!(held(&k), held(&v));
        held(&k)
    }

    #[test]
    fn a_buffer_grows_as_the_sequence_does_and_keeps_what_it_holds() {
        let mut c = LayerCache::new(40, None, 4);
        let grown = |c: &LayerCache| (c.slots(), c.version);
        assert_eq!(append(&mut c, 0, 3), (0..3).collect::<Vec<_>>());
        assert_eq!(grown(&c), (4, 1));
        append(&mut c, 3, 1);
        assert_eq!(grown(&c), (4, 1));
        // Twice the slots, or what a step needs where that is more, up to the capacity.
        assert_eq!(append(&mut c, 4, 1), (0..5).collect::<Vec<_>>());
        assert_eq!(grown(&c), (8, 2));
        append(&mut c, 5, 10);
        assert_eq!(grown(&c), (16, 3));
        assert_eq!(append(&mut c, 15, 20), (0..35).collect::<Vec<_>>());
        assert_eq!(grown(&c), (35, 4));
        append(&mut c, 35, 1);
        assert_eq!(grown(&c), (40, 5));
        // A first write of more than the first slots allocates what it needs.
        let mut c = LayerCache::new(4096, None, 4);
        append(&mut c, 0, 9);
        assert_eq!(grown(&c), (9, 1));
    }

    #[test]
    fn a_window_layer_keeps_what_later_positions_attend_to() {
        // A window of 4 keeps the 3 positions before the next one, in 3 + 16 slots of 40.
        let mut c = LayerCache::new(40, Some(4), FIRST_SLOTS);
        assert_eq!((c.room, c.keep), (19, Some(3)));
        // Room for 19; the 20th position drops all but the 3 before it.
        assert_eq!(append(&mut c, 0, 19), (0..19).collect::<Vec<_>>());
        assert_eq!(append(&mut c, 19, 1), vec![16, 17, 18, 19]);
        assert_eq!((c.len, c.dropped), (20, 16));
        // More than the slots at once: the step sees the kept positions and its own, the
        // layer keeps the last 3.
        assert_eq!(append(&mut c, 20, 17), (17..37).collect::<Vec<_>>());
        assert_eq!((c.len, c.dropped, c.held()), (37, 34, 3));
        assert_eq!(append(&mut c, 37, 3), (34..40).collect::<Vec<_>>());
        let message = c.append(&positions(40, 1), &positions(40, 1)).unwrap_err();
        assert!(
            message
                .to_string()
                .contains("holds 40 positions: 40 cached"),
            "{message}"
        );
    }

    #[test]
    fn a_window_that_covers_the_sequence_drops_nothing() {
        let c = LayerCache::new(12, Some(4), FIRST_SLOTS);
        assert_eq!((c.room, c.keep), (12, None));
        assert_eq!(window_slots(4097, 1 << 20), 4096 + 2048);
        assert_eq!(window_slots(1, 100), 16);
    }

    #[test]
    fn a_drop_moves_the_slot_tables_along_with_the_positions() {
        let config = serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
            "max_position_embeddings": 64
        }))
        .unwrap();
        let rope = RopeTables::new(&config, DType::F32, &Device::Cpu).unwrap();
        let mut c = LayerCache::new(24, Some(4), FIRST_SLOTS);
        append(&mut c, 0, 19);
        let (cos, _) = c.slot_tables(&rope).unwrap();
        assert_eq!(cos.dims(), [19, 2]);
        c.compact(3).unwrap();
        assert_eq!(c.dropped, 16);
        let (moved, _) = c.slot_tables(&rope).unwrap();
        let (all, _) = rope.decoding_rows(24).unwrap();
        let rows = |t: &Tensor, from, n| t.narrow(0, from, n).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows(&moved, 0, 8), rows(&all, 16, 8));
        // Slots past the sequence's last position get zero rows.
        assert_eq!(rows(&moved, 8, 11), vec![vec![0.0; 2]; 11]);
    }
}
