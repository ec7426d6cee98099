//! The residency provider's decisions: which expert of each host-resident expert layer sits in
//! which slot, and which copies one scheduler hook call makes.
//!
//! Owns the per-layer slot tables (one slot id holds the same expert for every expert tensor of
//! the layer — gate, up and down, or fused gate_up and down — so the three never disagree), the
//! admission and eviction rule, and the counters. Knows nothing about ggml or CUDA: copies go
//! through a [`Device`], which the provider implements with ggml's backend API (the engine's
//! own CUDA copies, in stream order) and the tests implement with host memory.
//!
//! Exactness (the one rule that matters): after [`Residency::serve`] returns `true`, every
//! byte range the stock scheduler would have written into the destination holds the bytes the
//! stock scheduler would have written there — each used expert's slice plus the bytes of the
//! following expert that stock copies as padding — because a slot is only ever filled from
//! those same host bytes. Nothing is dropped or approximated: an expert without a slot is
//! copied from host memory exactly as stock does. Returning `false` (decline) writes nothing
//! and the stock path runs.
//!
//! Admission: an expert gets a free slot, or the least recently used slot whose expert is not
//! used by this call and whose plan level is not above the newcomer's. Levels come from the
//! supervisor's plan (`want` on the control channel): 2 pinned hot set, 1 the policy's dynamic
//! tail, 0 not wanted. A layer without a plan treats every expert alike (plain LRU). A pinned
//! expert is never evicted.
//!
//! Wide calls (a batch of many tokens, as in prompt processing: more than [`WIDE_FACTOR`] × the
//! model's top-k experts used at once) touch nearly every expert of the layer once; admitting
//! them would evict decode's hot set right before decode starts. A wide call therefore admits
//! only into free slots, or over a slot whose plan level is strictly lower than the newcomer's;
//! the other misses are streamed (hits are served as always). Belady with bypass, the optimum
//! of the cache model, streams such one-off uses too.
//!
//! Copies are batched like stock's: every run of consecutive used experts that are not served
//! from a slot (streamed ones and ones being loaded) is one host → destination copy, and a
//! loaded expert is then copied device to device from the destination into its slot. A hit is
//! one slot → destination copy. [`Counters::copies_host`] and [`Counters::copies_device`] count
//! the calls.
//!
//! Why this file is over 800 lines: about 540 of them are tests (byte-exact random runs against
//! the stock copy, every admission rule); the decisions themselves are about 450 lines.

/// Stock ggml copies this many bytes (at most one expert) past the last expert of each run of
/// used experts, so that MMQ kernels never read NaNs from padding.
pub const PAD_MAX: usize = 512;

/// A call that uses more than this many times the model's top-k experts is wide (a batch of
/// many tokens): it admits only into free slots or over a lower plan level (module doc).
pub const WIDE_FACTOR: usize = 2;

/// Plan level of a pinned expert.
pub const PINNED: u8 = 2;
/// Plan level of an expert in the policy's dynamic tail.
pub const TAIL: u8 = 1;

const FREE: u32 = u32::MAX;

pub use spark_proto::hook::SlotCounts;

/// Where copies run. Every operation is ordered after the previous ones (one stream).
pub trait Device {
    /// The slot memory of one expert tensor of one layer.
    type Slots;
    /// The engine's destination buffer of one hook call.
    type Dst: Copy;
    /// Slot memory of `bytes`; `None` when the device has no room.
    fn alloc(&mut self, bytes: usize) -> Option<Self::Slots>;
    /// Host bytes into the destination at `dst_off` (what stock ggml does).
    fn host_to_dst(&mut self, dst: Self::Dst, dst_off: usize, src: &[u8]);
    /// `len` bytes of slot memory at `off` into the destination at `dst_off`.
    fn slots_to_dst(
        &mut self,
        slots: &Self::Slots,
        off: usize,
        dst: Self::Dst,
        dst_off: usize,
        len: usize,
    );
    /// `len` bytes of the destination at `dst_off` into slot memory at `off` (device to device,
    /// after the host copy that filled that range).
    fn dst_to_slots(
        &mut self,
        dst: Self::Dst,
        dst_off: usize,
        slots: &mut Self::Slots,
        off: usize,
        len: usize,
    );
}

/// One hook call, decoded.
pub struct Call<'a, D> {
    /// Model layer (`blk.N`).
    pub layer: u32,
    /// The tensor's name after `blk.N.` (for example `ffn_gate_exps.weight`).
    pub tensor: &'a str,
    /// Identity of the host tensor: a different model with the same names is declined.
    pub src_id: usize,
    pub n_expert: usize,
    pub expert_size: usize,
    /// The host tensor's bytes (at least `n_expert * expert_size`).
    pub src: &'a [u8],
    /// Used experts: bit `id % 32` of word `id / 32`.
    pub used: &'a [u32],
    pub dst: D,
}

impl<D> Call<'_, D> {
    fn is_used(&self, e: usize) -> bool {
        self.used[e / 32] & (1 << (e % 32)) != 0
    }

    /// Bytes stock copies for expert `e` when it ends a run: the slice plus the padding.
    fn span(&self, e: usize) -> usize {
        self.expert_size
            + if e + 1 < self.n_expert {
                pad(self.expert_size)
            } else {
                0
            }
    }
}

fn pad(expert_size: usize) -> usize {
    expert_size.min(PAD_MAX)
}

/// Counters, summed over calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub calls: u64,
    pub declined: u64,
    pub hits: u64,
    pub loads: u64,
    pub streamed: u64,
    pub evictions: u64,
    pub bytes_hit: u64,
    pub bytes_host: u64,
    /// Host → device copy calls (each a transfer over the link).
    pub copies_host: u64,
    /// Device → device copy calls (slot → destination, destination → slot).
    pub copies_device: u64,
    /// Host → device copy calls the provider made before it batched (one per loaded expert,
    /// one per run of streamed ones): the "before" of `copies_host`, for benchmarks.
    pub copies_host_unbatched: u64,
    /// Wide calls (module doc) and what they did; hits + loads + streamed of the narrow ones
    /// (decode) are the totals less these.
    pub wide_calls: u64,
    pub wide_hits: u64,
    pub wide_loads: u64,
    pub wide_streamed: u64,
}

impl Counters {
    /// Counts one call that the stock path serves (meter mode: no slots, every call declined):
    /// every used expert is copied from host memory, in runs of consecutive ids with the
    /// padding after each run, exactly as stock ggml copies them.
    pub fn meter_stock<D>(&mut self, call: &Call<'_, D>) {
        self.calls += 1;
        self.declined += 1;
        let (n, es) = (call.n_expert, call.expert_size);
        if call.used.len() * 32 < n {
            return;
        }
        let mut e = 0;
        while e < n {
            if !call.is_used(e) {
                e += 1;
                continue;
            }
            let first = e;
            while e + 1 < n && call.is_used(e + 1) {
                e += 1;
            }
            self.streamed += (e - first + 1) as u64;
            self.bytes_host += (e * es + call.span(e) - first * es) as u64;
            self.copies_host += 1;
            e += 1;
        }
    }
}

struct Kind<S> {
    name: String,
    src_id: usize,
    expert_size: usize,
    stride: usize,
    /// `None` in a layer with 0 slots (every used expert streamed).
    mem: Option<S>,
    /// Whether each slot holds this tensor's slice of the slot's expert.
    loaded: Vec<bool>,
}

struct Layer<S> {
    n_expert: usize,
    /// Whose device the slot memory lives on.
    device_id: usize,
    /// Slot memory could not be had: this layer is declined from now on.
    failed: bool,
    /// Expert → slot, -1 when not resident.
    table: Vec<i32>,
    slot_expert: Vec<u32>,
    last_use: Vec<u64>,
    kinds: Vec<Kind<S>>,
}

/// The provider's state: slot tables of every layer seen, and the counters.
pub struct Residency<S> {
    slots: SlotCounts,
    /// The model's experts per token (0: unknown, no call is wide).
    top_k: usize,
    /// Whether wide calls take the wide admission rule (off: they admit like decode, and are
    /// still counted apart).
    wide_rule: bool,
    layers: Vec<Option<Layer<S>>>,
    /// Layers that hold slot memory (kept as memory is allocated or a layer fails).
    with_memory: u32,
    tick: u64,
    pub counters: Counters,
}

impl<S> Residency<S> {
    /// A provider with `slots` slots per expert layer (0: decline everything).
    pub fn new(slots: u32) -> Residency<S> {
        Self::with_counts(SlotCounts::Uniform(slots))
    }

    /// A provider with `counts` slots in each expert layer (`0` alone: decline everything; a
    /// layer with 0 slots in a per-layer list streams every used expert).
    pub fn with_counts(counts: SlotCounts) -> Residency<S> {
        Residency {
            slots: counts,
            top_k: 0,
            wide_rule: true,
            layers: Vec::new(),
            with_memory: 0,
            tick: 0,
            counters: Counters::default(),
        }
    }

    /// Sets the model's experts per token, which tells wide calls from decode (0: unknown).
    pub fn set_top_k(&mut self, top_k: usize) {
        self.top_k = top_k;
    }

    /// Switches the wide admission rule (on by default); wide calls are counted either way.
    pub fn set_wide_rule(&mut self, on: bool) {
        self.wide_rule = on;
    }

    /// Layers that hold slot memory.
    pub fn layers_with_memory(&self) -> u32 {
        self.with_memory
    }

    /// The expert in `slot` of `layer`, if any.
    #[cfg(test)]
    pub fn slot_expert(&self, layer: u32, slot: usize) -> Option<u32> {
        let l = self.layers.get(layer as usize)?.as_ref()?;
        l.slot_expert.get(slot).copied().filter(|&e| e != FREE)
    }

    /// Serves one hook call on `dev` (whose slot memory is identified by `device_id`):
    /// `true` when every used expert has been written into the destination, `false` to decline
    /// (nothing written). `level` is the supervisor's plan for the call's layer, if it sent one.
    pub fn serve<D: Device<Slots = S>>(
        &mut self,
        dev: &mut D,
        device_id: usize,
        call: &Call<'_, D::Dst>,
        level: Option<&dyn Fn(u32) -> u8>,
    ) -> bool {
        self.counters.calls += 1;
        let ok = self.try_serve(dev, device_id, call, level);
        if !ok {
            self.counters.declined += 1;
        }
        ok
    }

    fn try_serve<D: Device<Slots = S>>(
        &mut self,
        dev: &mut D,
        device_id: usize,
        call: &Call<'_, D::Dst>,
        level: Option<&dyn Fn(u32) -> u8>,
    ) -> bool {
        let (n, es) = (call.n_expert, call.expert_size);
        if self.slots.is_off()
            || n == 0
            || es == 0
            || call.used.len() * 32 < n
            || n.checked_mul(es).is_none_or(|b| call.src.len() < b)
        {
            return false;
        }
        let li = call.layer as usize;
        if self.layers.len() <= li {
            self.layers.resize_with(li + 1, || None);
        }
        let slots = (self.slots.of_layer(call.layer) as usize).min(n);
        let layer = self.layers[li].get_or_insert_with(|| Layer {
            n_expert: n,
            device_id,
            failed: false,
            table: vec![-1; n],
            slot_expert: vec![FREE; slots],
            last_use: vec![0; slots],
            kinds: Vec::new(),
        });
        if layer.failed || layer.n_expert != n || layer.device_id != device_id {
            return false;
        }
        let k = match layer.kinds.iter().position(|k| k.name == call.tensor) {
            Some(k) => k,
            None => {
                let stride = es + pad(es);
                let mem = match slots {
                    0 => None, // streamed: no slot memory
                    _ => match stride.checked_mul(slots).and_then(|b| dev.alloc(b)) {
                        Some(mem) => Some(mem),
                        None => {
                            if !layer.kinds.is_empty() {
                                self.with_memory -= 1;
                            }
                            layer.failed = true;
                            return false;
                        }
                    },
                };
                if layer.kinds.is_empty() && mem.is_some() {
                    self.with_memory += 1;
                }
                layer.kinds.push(Kind {
                    name: call.tensor.to_string(),
                    src_id: call.src_id,
                    expert_size: es,
                    stride,
                    mem,
                    loaded: vec![false; slots],
                });
                layer.kinds.len() - 1
            }
        };
        if layer.kinds[k].expert_size != es || layer.kinds[k].src_id != call.src_id {
            return false;
        }

        self.tick += 1;
        let tick = self.tick;
        let c = &mut self.counters;
        let n_used = call
            .used
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum::<usize>();
        let wide = self.top_k > 0 && n_used > WIDE_FACTOR * self.top_k;
        // Slots first (layer-wide), so that the copies below see the final table.
        for e in (0..n).filter(|&e| call.is_used(e)) {
            let s = layer.table[e];
            if s >= 0 {
                layer.last_use[s as usize] = tick;
            } else if let Some(s) = admit(layer, call, e, level, wide && self.wide_rule) {
                if layer.slot_expert[s] != FREE {
                    layer.table[layer.slot_expert[s] as usize] = -1;
                    c.evictions += 1;
                }
                layer.slot_expert[s] = e as u32;
                layer.table[e] = s as i32;
                layer.last_use[s] = tick;
                for kind in &mut layer.kinds {
                    kind.loaded[s] = false;
                }
            }
        }
        // Copies in expert order. Used experts not served from a slot (streamed, or loaded now)
        // go host → destination in runs of consecutive ids, exactly as stock copies them; a
        // loaded expert then goes destination → slot, a hit slot → destination.
        let kind = &mut layer.kinds[k];
        let (hits0, loads0, streamed0) = (c.hits, c.loads, c.streamed);
        let served_from_slot = |e: usize, kind: &Kind<S>| {
            let s = layer.table[e];
            s >= 0 && kind.loaded[s as usize]
        };
        let mut e = 0;
        while e < n {
            if !call.is_used(e) {
                e += 1;
                continue;
            }
            if let (true, Some(mem)) = (served_from_slot(e, kind), kind.mem.as_ref()) {
                let s = layer.table[e] as usize;
                let (at, len) = (s * kind.stride, call.span(e));
                dev.slots_to_dst(mem, at, call.dst, e * es, len);
                c.hits += 1;
                c.bytes_hit += len as u64;
                c.copies_device += 1;
                e += 1;
                continue;
            }
            let first = e;
            while e + 1 < n && call.is_used(e + 1) && !served_from_slot(e + 1, kind) {
                e += 1;
            }
            let (from, to) = (first * es, e * es + call.span(e));
            dev.host_to_dst(call.dst, from, &call.src[from..to]);
            c.bytes_host += (to - from) as u64;
            c.copies_host += 1;
            for x in first..=e {
                let s = layer.table[x];
                // (A slot exists only where the layer has slot memory.)
                let Some(mem) = kind.mem.as_mut().filter(|_| s >= 0) else {
                    c.streamed += 1;
                    // Unbatched, a streamed run ended at any expert with a slot.
                    if x == first || layer.table[x - 1] >= 0 {
                        c.copies_host_unbatched += 1;
                    }
                    continue;
                };
                c.copies_host_unbatched += 1;
                let s = s as usize;
                let (at, len) = (s * kind.stride, call.span(x));
                dev.dst_to_slots(call.dst, x * es, mem, at, len);
                kind.loaded[s] = true;
                c.loads += 1;
                c.copies_device += 1;
            }
            e += 1;
        }
        if wide {
            c.wide_calls += 1;
            c.wide_hits += c.hits - hits0;
            c.wide_loads += c.loads - loads0;
            c.wide_streamed += c.streamed - streamed0;
        }
        true
    }
}

/// The slot expert `e` may take: a free one, else the least recently used slot whose expert
/// this call does not use, is not pinned, and whose level is not above `e`'s (in a wide call:
/// strictly below it, so one-off uses never displace what decode reuses).
fn admit<S, D>(
    layer: &Layer<S>,
    call: &Call<'_, D>,
    e: usize,
    level: Option<&dyn Fn(u32) -> u8>,
    wide: bool,
) -> Option<usize> {
    if let Some(s) = layer.slot_expert.iter().position(|&x| x == FREE) {
        return Some(s);
    }
    let lv = |x: u32| level.map_or(TAIL, |f| f(x).min(PINNED));
    let mine = lv(e as u32);
    let may_evict = |x: u32| if wide { lv(x) < mine } else { lv(x) <= mine };
    layer
        .slot_expert
        .iter()
        .enumerate()
        .filter(|&(_, &x)| !call.is_used(x as usize) && lv(x) < PINNED && may_evict(x))
        .min_by_key(|&(s, &x)| (lv(x), layer.last_use[s]))
        .map(|(s, _)| s)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Host memory standing in for the GPU: slot memory is a byte vector, the destination is
    /// one byte vector per test. Counts the bytes each kind of copy moved.
    #[derive(Default)]
    pub struct HostDevice {
        pub dst: Vec<u8>,
        pub budget: Option<usize>,
        pub allocated: usize,
        pub h2d: usize,
        pub d2d: usize,
    }

    impl Device for HostDevice {
        type Slots = Vec<u8>;
        type Dst = ();
        fn alloc(&mut self, bytes: usize) -> Option<Vec<u8>> {
            if self.budget.is_some_and(|b| self.allocated + bytes > b) {
                return None;
            }
            self.allocated += bytes;
            // Garbage, not zeros: a slot read before it is filled must show up as wrong bytes.
            Some((0..bytes).map(|i| (i * 7 + 3) as u8).collect())
        }
        fn host_to_dst(&mut self, _: (), dst_off: usize, src: &[u8]) {
            self.dst[dst_off..dst_off + src.len()].copy_from_slice(src);
            self.h2d += src.len();
        }
        fn slots_to_dst(&mut self, slots: &Vec<u8>, off: usize, _: (), dst_off: usize, len: usize) {
            self.dst[dst_off..dst_off + len].copy_from_slice(&slots[off..off + len]);
            self.d2d += len;
        }
        fn dst_to_slots(
            &mut self,
            _: (),
            dst_off: usize,
            slots: &mut Vec<u8>,
            off: usize,
            len: usize,
        ) {
            slots[off..off + len].copy_from_slice(&self.dst[dst_off..dst_off + len]);
            self.d2d += len;
        }
    }

    /// What stock ggml writes into `dst` (ggml_backend_sched_compute_splits, MoE-offload
    /// branch): runs of consecutive used experts, each with up to 512 bytes of padding after
    /// the run unless it ends at the last expert.
    pub fn stock_copy(dst: &mut [u8], src: &[u8], used: &[u32], n: usize, es: usize) {
        let is_used = |e: usize| used[e / 32] & (1 << (e % 32)) != 0;
        let mut e = 0;
        while e < n {
            if !is_used(e) {
                e += 1;
                continue;
            }
            let first = e;
            while e + 1 < n && is_used(e + 1) {
                e += 1;
            }
            let pad_end = if e < n - 1 { es.min(512) } else { 0 };
            let (from, to) = (first * es, (e + 1) * es + pad_end);
            dst[from..to].copy_from_slice(&src[from..to]);
            e += 1;
        }
    }

    /// A small deterministic generator (xorshift) so the tests need no extra crate.
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn bitset(ids: &[usize], n: usize) -> Vec<u32> {
        let mut b = vec![0u32; n.div_ceil(32)];
        for &e in ids {
            b[e / 32] |= 1 << (e % 32);
        }
        b
    }

    struct Model {
        /// Host tensors of every (layer, kind), each with its own expert size.
        tensors: Vec<(u32, &'static str, usize, Vec<u8>)>,
    }

    fn model(layers: u32, n: usize, rng: &mut Rng) -> Model {
        let mut tensors = Vec::new();
        for l in 0..layers {
            // Sizes below and above the 512-byte padding; the down slice differs in size.
            for (kind, es) in [
                ("ffn_gate_exps.weight", 300),
                ("ffn_up_exps.weight", 300),
                ("ffn_down_exps.weight", 700),
            ] {
                let bytes = (0..n * es + 64).map(|_| rng.next() as u8).collect();
                tensors.push((l, kind, es, bytes));
            }
        }
        Model { tensors }
    }

    /// Random steps (decode-like top-k and prompt-like wide sets), random plans: after every
    /// call the destination equals what stock ggml would have left there, byte for byte.
    #[test]
    fn destinations_equal_the_stock_copy_after_random_steps_and_plans() {
        for seed in 1..=12u64 {
            let mut rng = Rng::new(seed);
            let n = [8usize, 33, 64][seed as usize % 3];
            let m = model(3, n, &mut rng);
            let slots = 1 + rng.below(n as u64 / 2) as u32;
            let mut res: Residency<Vec<u8>> = Residency::new(slots);
            // Half the seeds know the model's top-k, so their wide steps take the wide rule.
            if seed % 2 == 0 {
                res.set_top_k(2);
            }
            let mut dev = HostDevice::default();
            let mut plans: Vec<Option<Vec<u8>>> = vec![None; 3];
            for step in 0..60 {
                if rng.below(10) == 0 {
                    let l = rng.below(3) as usize;
                    plans[l] = Some((0..n).map(|_| rng.below(3) as u8).collect());
                }
                let wide = rng.below(8) == 0;
                let k = if wide { n } else { 1 + rng.below(4) as usize };
                let mut ids: Vec<usize> = (0..k).map(|_| rng.below(n as u64) as usize).collect();
                if step % 7 == 0 {
                    ids.push(n - 1); // the last expert has no padding after it
                }
                let used = bitset(&ids, n);
                for (layer, kind, es, src) in &m.tensors {
                    let garbage: Vec<u8> = (0..n * es + 64).map(|_| rng.next() as u8).collect();
                    let mut want = garbage.clone();
                    stock_copy(&mut want, src, &used, n, *es);
                    dev.dst = garbage;
                    let call = Call {
                        layer: *layer,
                        tensor: kind,
                        src_id: src.as_ptr() as usize,
                        n_expert: n,
                        expert_size: *es,
                        src,
                        used: &used,
                        dst: (),
                    };
                    let plan = plans[*layer as usize].clone();
                    let f = move |e: u32| plan.as_ref().map_or(TAIL, |p| p[e as usize]);
                    let has_plan = plans[*layer as usize].is_some();
                    let level: Option<&dyn Fn(u32) -> u8> = if has_plan { Some(&f) } else { None };
                    assert!(res.serve(&mut dev, 0, &call, level));
                    assert!(
                        dev.dst == want,
                        "seed {seed} step {step} layer {layer} {kind}: destination differs from stock"
                    );
                }
            }
            let c = res.counters;
            assert_eq!(c.declined, 0);
            assert!(c.hits > 0, "seed {seed}: no hits in 60 steps: {c:?}");
        }
    }

    /// A per-layer list: each layer gets its own slot memory and table; a layer with 0 slots
    /// (named or not) streams every used expert, holds no memory, and stays exact.
    #[test]
    fn per_layer_counts_give_each_layer_its_slots_and_stream_a_layer_with_none() {
        let mut rng = Rng::new(21);
        let n = 16;
        let m = model(4, n, &mut rng);
        let counts = SlotCounts::PerLayer(vec![(0, 0), (1, 2), (2, 6)]);
        let mut res: Residency<Vec<u8>> = Residency::with_counts(counts);
        let mut dev = HostDevice::default();
        for step in 0..40 {
            let k = 1 + rng.below(4) as usize;
            let ids: Vec<usize> = (0..k).map(|_| rng.below(4) as usize * 3).collect();
            let used = bitset(&ids, n);
            for (layer, kind, es, src) in &m.tensors {
                let garbage: Vec<u8> = (0..n * es + 64).map(|_| rng.next() as u8).collect();
                let mut want = garbage.clone();
                stock_copy(&mut want, src, &used, n, *es);
                dev.dst = garbage;
                let call = Call {
                    layer: *layer,
                    tensor: kind,
                    src_id: src.as_ptr() as usize,
                    n_expert: n,
                    expert_size: *es,
                    src,
                    used: &used,
                    dst: (),
                };
                assert!(res.serve(&mut dev, 0, &call, None));
                assert!(dev.dst == want, "step {step} layer {layer} {kind}: differs");
            }
        }
        // Slot memory for layers 1 and 2 only: a slot row is 300 + 300 + 300 + 300 + 700 + 512.
        assert_eq!(dev.allocated, (2 + 6) * 2412);
        assert_eq!(res.layers_with_memory(), 2);
        assert_eq!(res.slot_expert(0, 0), None);
        assert_eq!(res.slot_expert(3, 0), None);
        assert!(res.slot_expert(1, 1).is_some() && res.slot_expert(1, 2).is_none());
        // Four distinct experts are used: six slots hold them all, two change hands.
        assert!((0..4).all(|s| res.slot_expert(2, s).is_some()));
        let c = res.counters;
        assert_eq!(c.declined, 0, "{c:?}");
        assert!(c.hits > 0 && c.streamed > 0 && c.evictions > 0, "{c:?}");
    }

    #[test]
    fn repeated_experts_are_served_from_slots_and_counted() {
        let mut rng = Rng::new(5);
        let m = model(1, 16, &mut rng);
        let mut res: Residency<Vec<u8>> = Residency::new(4);
        let mut dev = HostDevice::default();
        let used = bitset(&[2, 3, 9], 16);
        for round in 0..3 {
            for (layer, kind, es, src) in &m.tensors {
                dev.dst = vec![0; 16 * es + 64];
                let call = Call {
                    layer: *layer,
                    tensor: kind,
                    src_id: 1,
                    n_expert: 16,
                    expert_size: *es,
                    src,
                    used: &used,
                    dst: (),
                };
                let h2d = dev.h2d;
                assert!(res.serve(&mut dev, 0, &call, None));
                if round > 0 {
                    assert_eq!(
                        dev.h2d, h2d,
                        "round {round}: a resident expert was copied from host"
                    );
                }
            }
        }
        let c = res.counters;
        assert_eq!((c.loads, c.hits, c.streamed, c.evictions), (9, 18, 0, 0));
        // per round: gate and up 3 × (300 + 300 padding), down 3 × (700 + 512 padding)
        assert_eq!(c.bytes_hit as usize, 2 * (2 * 3 * 600 + 3 * 1212));
    }

    #[test]
    fn pinned_experts_stay_and_unwanted_ones_do_not_displace_the_plan() {
        let mut rng = Rng::new(9);
        let m = model(1, 8, &mut rng);
        let (_, kind, es, src) = &m.tensors[0];
        let mut res: Residency<Vec<u8>> = Residency::new(2);
        let mut dev = HostDevice::default();
        // expert 0 pinned, 1 in the tail, the rest not wanted
        let f = |e: u32| match e {
            0 => PINNED,
            1 => TAIL,
            _ => 0,
        };
        let mut step = |ids: &[usize]| {
            let used = bitset(ids, 8);
            dev.dst = vec![0; 8 * es + 64];
            let call = Call {
                layer: 0,
                tensor: kind,
                src_id: 1,
                n_expert: 8,
                expert_size: *es,
                src,
                used: &used,
                dst: (),
            };
            assert!(res.serve(&mut dev, 0, &call, Some(&f)));
            let mut want = vec![0; 8 * es + 64];
            stock_copy(&mut want, src, &used, 8, *es);
            assert!(dev.dst == want);
        };
        step(&[0, 1]);
        for e in 2..8 {
            step(&[e]); // not wanted: streamed, never evicts 0 or 1
        }
        step(&[1]);
        assert_eq!(res.slot_expert(0, 0), Some(0));
        assert_eq!(res.slot_expert(0, 1), Some(1));
        assert_eq!(res.counters.evictions, 0);
        assert_eq!(res.counters.streamed, 6);
        assert_eq!(res.counters.hits, 1);
    }

    #[test]
    fn meter_counts_exactly_the_bytes_the_stock_copy_moves() {
        let mut rng = Rng::new(7);
        for &(n, es) in &[(8usize, 40usize), (33, 700), (64, 2048)] {
            let src: Vec<u8> = (0..n * es + 600).map(|i| (i % 251) as u8).collect();
            let mut c = Counters::default();
            let (mut want_bytes, mut want_experts) = (0u64, 0u64);
            for _ in 0..50 {
                let ids: Vec<usize> = (0..n).filter(|_| rng.next().is_multiple_of(3)).collect();
                let used = bitset(&ids, n);
                // The stock copy of an all-ones source into zeros: its sum is the bytes moved.
                let mut dst = vec![0u8; n * es + 600];
                stock_copy(&mut dst, &vec![1u8; src.len()], &used, n, es);
                want_bytes += dst.iter().map(|&b| u64::from(b)).sum::<u64>();
                want_experts += ids.len() as u64;
                c.meter_stock(&Call {
                    layer: 0,
                    tensor: "ffn_up_exps.weight",
                    src_id: 1,
                    n_expert: n,
                    expert_size: es,
                    src: &src,
                    used: &used,
                    dst: (),
                });
            }
            assert_eq!(c.bytes_host, want_bytes, "n={n} es={es}");
            assert_eq!(c.streamed, want_experts);
            assert_eq!((c.calls, c.declined, c.hits, c.loads), (50, 50, 0, 0));
        }
    }

    #[test]
    fn declines_without_slots_memory_or_for_another_model_and_writes_nothing() {
        let mut rng = Rng::new(3);
        let m = model(1, 8, &mut rng);
        let (_, kind, es, src) = &m.tensors[0];
        let used = bitset(&[1, 2], 8);
        let call = |src_id| Call {
            layer: 0,
            tensor: kind,
            src_id,
            n_expert: 8,
            expert_size: *es,
            src,
            used: &used,
            dst: (),
        };
        let before = vec![9u8; 8 * es + 64];

        let mut off: Residency<Vec<u8>> = Residency::new(0);
        let mut dev = HostDevice {
            dst: before.clone(),
            ..HostDevice::default()
        };
        assert!(!off.serve(&mut dev, 0, &call(1), None));

        let mut poor: Residency<Vec<u8>> = Residency::new(4);
        dev.budget = Some(100);
        assert!(!poor.serve(&mut dev, 0, &call(1), None));
        assert!(
            !poor.serve(&mut dev, 0, &call(1), None),
            "a failed layer stays declined"
        );
        assert_eq!(poor.counters.declined, 2);
        assert_eq!(poor.layers_with_memory(), 0);

        // Room for the gate slots (4 × 600 bytes) but not the up slots: the layer had memory,
        // then fails, and no longer counts.
        let mut half: Residency<Vec<u8>> = Residency::new(4);
        let mut dev2 = HostDevice {
            dst: before.clone(),
            budget: Some(3000),
            ..HostDevice::default()
        };
        assert!(half.serve(&mut dev2, 0, &call(1), None));
        assert_eq!(half.layers_with_memory(), 1);
        let (_, up, _, up_src) = &m.tensors[1];
        let up_call = Call {
            tensor: up,
            src: up_src,
            src_id: 7,
            ..call(1)
        };
        assert!(!half.serve(&mut dev2, 0, &up_call, None));
        assert_eq!(half.layers_with_memory(), 0);

        let mut res: Residency<Vec<u8>> = Residency::new(4);
        dev.budget = None;
        assert!(res.serve(&mut dev, 0, &call(1), None));
        dev.dst = before.clone();
        assert!(
            !res.serve(&mut dev, 0, &call(2), None),
            "same name, other tensor"
        );
        assert!(!res.serve(&mut dev, 1, &call(1), None), "other device");
        assert!(
            dev.dst == before,
            "a declined call wrote into the destination"
        );
    }

    /// One layer, one tensor, 16 experts of 300 bytes: serves `ids` and checks the destination
    /// against the stock copy.
    fn step16(res: &mut Residency<Vec<u8>>, dev: &mut HostDevice, src: &[u8], ids: &[usize]) {
        let used = bitset(ids, 16);
        dev.dst = vec![0; src.len()];
        let call = Call {
            layer: 0,
            tensor: "ffn_up_exps.weight",
            src_id: 1,
            n_expert: 16,
            expert_size: 300,
            src,
            used: &used,
            dst: (),
        };
        assert!(res.serve(dev, 0, &call, None));
        let mut want = vec![0; src.len()];
        stock_copy(&mut want, src, &used, 16, 300);
        assert!(dev.dst == want, "{ids:?}: destination differs from stock");
    }

    #[test]
    fn runs_of_experts_not_in_slots_take_one_host_copy_each() {
        let mut rng = Rng::new(21);
        let src: Vec<u8> = (0..16 * 300 + 64).map(|_| rng.next() as u8).collect();
        let mut res: Residency<Vec<u8>> = Residency::new(4);
        let mut dev = HostDevice::default();
        // 2, 3, 4 form one run: one host copy, then three device copies into slots; 9 is a
        // second run.
        step16(&mut res, &mut dev, &src, &[2, 3, 4, 9]);
        let c = res.counters;
        assert_eq!(
            (c.loads, c.copies_host, c.copies_device),
            (4, 2, 4),
            "{c:?}"
        );
        // 2 and 3 are hits; 5 and 6 take the slots of 4 and 9 (the least recent, not used by
        // this call) as one run; no slot is left for 11, which is streamed as its own run.
        step16(&mut res, &mut dev, &src, &[2, 3, 5, 6, 11]);
        let d = res.counters;
        // Before batching: one host copy per loaded expert (5, 6) and one for the run [11].
        assert_eq!(d.copies_host_unbatched - c.copies_host_unbatched, 3);
        assert_eq!(
            c.copies_host_unbatched, 4,
            "2, 3, 4 and 9 loaded one by one"
        );
        assert_eq!(d.hits - c.hits, 2);
        assert_eq!((d.loads - c.loads, d.streamed - c.streamed), (2, 1));
        assert_eq!(
            d.copies_host - c.copies_host,
            2,
            "runs [5, 6] and [11]: {d:?}"
        );
        assert_eq!(
            d.copies_device - c.copies_device,
            4,
            "2 hits + 2 loads: {d:?}"
        );
        // bytes over the link: run [5, 6] is 2 × 300 + 300 padding, [11] is 300 + 300
        assert_eq!(d.bytes_host - c.bytes_host, 900 + 600);
        // A later step serves 5 and 6 from their slots: no host copy at all.
        step16(&mut res, &mut dev, &src, &[5, 6]);
        assert_eq!(res.counters.copies_host, d.copies_host);
    }

    #[test]
    fn a_wide_call_does_not_flush_what_decode_reuses() {
        let mut rng = Rng::new(33);
        let src: Vec<u8> = (0..16 * 300 + 64).map(|_| rng.next() as u8).collect();
        for top_k in [0usize, 2] {
            let mut res: Residency<Vec<u8>> = Residency::new(4);
            res.set_top_k(top_k);
            let mut dev = HostDevice::default();
            // Decode warms 1, 2, 3, 4 (top-2).
            for ids in [[1, 2], [3, 4], [1, 2], [3, 4]] {
                step16(&mut res, &mut dev, &src, &ids);
            }
            // A prompt batch uses 12 experts, the warm ones not among them.
            step16(
                &mut res,
                &mut dev,
                &src,
                &[0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            );
            let before = res.counters.hits;
            for ids in [[1, 2], [3, 4]] {
                step16(&mut res, &mut dev, &src, &ids);
            }
            let hits_after = res.counters.hits - before;
            if top_k == 0 {
                // Unknown top-k: every call is narrow, the batch evicted the warm set.
                assert_eq!(hits_after, 0, "{:?}", res.counters);
                assert_eq!(res.counters.wide_calls, 0);
            } else {
                assert_eq!(hits_after, 4, "{:?}", res.counters);
                assert_eq!(res.counters.wide_calls, 1);
                assert_eq!(res.counters.wide_streamed, 12);
                assert_eq!(res.counters.evictions, 0);
            }
        }
    }

    #[test]
    fn a_wide_call_still_fills_free_slots_and_displaces_unwanted_ones_for_wanted_ones() {
        let mut rng = Rng::new(34);
        let src: Vec<u8> = (0..16 * 300 + 64).map(|_| rng.next() as u8).collect();
        let mut res: Residency<Vec<u8>> = Residency::new(4);
        res.set_top_k(1);
        let mut dev = HostDevice::default();
        step16(&mut res, &mut dev, &src, &[0, 1, 2, 3, 4, 5]);
        assert_eq!(
            (
                res.counters.loads,
                res.counters.streamed,
                res.counters.evictions
            ),
            (4, 2, 0)
        );
        // A plan that wants 9 in the tail and nothing else: a wide call may put 9 over an
        // unwanted expert, and nothing else moves.
        let f = |e: u32| if e == 9 { TAIL } else { 0 };
        let used = bitset(&[7, 8, 9], 16);
        dev.dst = vec![0; src.len()];
        let call = Call {
            layer: 0,
            tensor: "ffn_up_exps.weight",
            src_id: 1,
            n_expert: 16,
            expert_size: 300,
            src: &src,
            used: &used,
            dst: (),
        };
        assert!(res.serve(&mut dev, 0, &call, Some(&f)));
        assert_eq!(res.counters.evictions, 1);
        assert_eq!(res.counters.loads, 5);
        assert!((0..4).any(|s| res.slot_expert(0, s) == Some(9)));
    }
}
