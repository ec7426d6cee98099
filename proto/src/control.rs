//! The control line protocol between the supervisor and the tap: grammar, parsing, replies.
//!
//! Why this file is over 800 lines: the control grammar (commands, replies, plans, counters) is
//! one protocol read as a whole, and about 200 of its lines are tests.
//!
//! Owns the text of every line either side may send and the dispatch of a command line to a
//! [`TapControl`] implementation (so the grammar and its answers are written once and replayed
//! against golden transcripts). It never reads or writes a socket and never blocks; the two
//! ends do the I/O, each with its own deadlines.
//!
//! Grammar (one line per message, `\n`-terminated, at most [`MAX_LINE`] bytes, ASCII):
//!
//! ```text
//! greeting  = "spark-tap " version " arch=" word " n_layer=" u " n_expert=" u
//!             " n_expert_used=" u " n_embd=" u            (tap → supervisor, once, first)
//! command   = "stats" | "flush" | "reset" | "quit" | "request " u
//!           | "hidden off" | "hidden on every=" u " budget=" u " tensor=" ("ffn_norm"|"attn_norm")
//!           | "residency"                               (the provider's counters)
//!           | "residency layers" [" " u]                 (its counters per layer, one page
//!                                                        from that layer on)
//!           | "want " layer " " ids " " ids              (residency plan of one layer:
//!                                                        pinned hot set, then dynamic tail)
//! ids       = "-" | u ("," u)*
//! reply     = "ok" [" " text] | "err " code " " message
//! code      = "unknown-verb" | "bad-args" | "too-long" | "unavailable"
//! ```
//!
//! Every command gets exactly one reply line. An unknown verb gets `err unknown-verb`; clean EOF
//! from the supervisor ends the session and is not an error.

use std::fmt::Write as _;

/// Protocol version carried in the greeting.
pub const CONTROL_VERSION: u32 = 1;
/// Longest line either side sends or accepts, newline excluded.
pub const MAX_LINE: usize = 1024;

/// The tap's greeting: protocol version and the model geometry the tap saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub version: u32,
    pub arch: String,
    pub n_layer: u32,
    /// 0 for a dense model (no MoE layers).
    pub n_expert: u32,
    pub n_expert_used: u32,
    pub n_embd: u32,
}

impl Greeting {
    pub fn to_line(&self) -> String {
        format!(
            "spark-tap {} arch={} n_layer={} n_expert={} n_expert_used={} n_embd={}",
            self.version, self.arch, self.n_layer, self.n_expert, self.n_expert_used, self.n_embd
        )
    }

    pub fn parse(line: &str) -> Result<Greeting, String> {
        let mut words = line.split_ascii_whitespace();
        if words.next() != Some("spark-tap") {
            return Err(format!("not a spark-tap greeting: {line:?}"));
        }
        let version: u32 = words
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("greeting without a version: {line:?}"))?;
        if version != CONTROL_VERSION {
            return Err(format!(
                "tap speaks control protocol {version}, this spark speaks {CONTROL_VERSION}"
            ));
        }
        let kv = KeyValues::parse(words)?;
        Ok(Greeting {
            version,
            arch: kv.get("arch")?.to_string(),
            n_layer: kv.u32("n_layer")?,
            n_expert: kv.u32("n_expert")?,
            n_expert_used: kv.u32("n_expert_used")?,
            n_embd: kv.u32("n_embd")?,
        })
    }
}

/// Which graph tensor carries the pre-gate hidden state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenTensor {
    FfnNorm,
    AttnNorm,
    /// The vector the router multiplies, whatever the arch names it: the input of each layer's
    /// `ffn_moe_logits` product (on qwen3moe, llama and deepseek2 the same as `ffn_norm`; on
    /// qwen35moe, qwen3next and gpt-oss `attn_post_norm`, on glm4moe `post_attn_norm`, on gemma4
    /// an unnamed scaled norm of the attention output).
    RouterInput,
}

impl HiddenTensor {
    pub const ALL: [HiddenTensor; 3] = [
        HiddenTensor::FfnNorm,
        HiddenTensor::AttnNorm,
        HiddenTensor::RouterInput,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HiddenTensor::FfnNorm => "ffn_norm",
            HiddenTensor::AttnNorm => "attn_norm",
            HiddenTensor::RouterInput => "router_input",
        }
    }

    pub fn parse(s: &str) -> Option<HiddenTensor> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    /// The byte stored in `ring::HiddenChunk::tensor` and the hidden file.
    pub fn code(self) -> u8 {
        match self {
            HiddenTensor::FfnNorm => 0,
            HiddenTensor::AttnNorm => 1,
            HiddenTensor::RouterInput => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<HiddenTensor> {
        Self::ALL.into_iter().find(|t| t.code() == c)
    }
}

/// Hidden-state capture settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HiddenConfig {
    /// Capture every Nth token (≥ 1).
    pub every: u32,
    /// Byte budget in MiB (≥ 1).
    pub budget_mib: u32,
    pub tensor: HiddenTensor,
}

/// A command from the supervisor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Stats,
    Flush,
    Reset,
    Quit,
    /// Stamp following records with this request id.
    Request(u32),
    Hidden(Option<HiddenConfig>),
    /// Report the residency provider's counters.
    Residency,
    /// Report its counters per layer: one page of a snapshot, from this layer on (0 takes a
    /// fresh snapshot; a later page continues the same one).
    ResidencyLayers {
        from: u32,
    },
    /// The residency plan of one layer (`blk.<layer>`): experts to keep pinned, and the
    /// dynamic tail the policy wants resident. Replaces the layer's previous plan.
    Want(WantPlan),
    /// More ids for the layer named (a plan too long for one line continues with `want+`).
    WantMore(WantPlan),
}

/// One layer's residency plan, as the supervisor's policy wants it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WantPlan {
    /// Model layer index (`blk.N`).
    pub layer: u32,
    /// Never evicted once resident.
    pub pinned: Vec<u32>,
    /// Kept resident while slots allow; evicted before any pinned expert.
    pub tail: Vec<u32>,
}

impl WantPlan {
    fn ids_text(ids: &[u32]) -> String {
        if ids.is_empty() {
            return "-".into();
        }
        let mut s = String::new();
        for (i, e) in ids.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{e}");
        }
        s
    }

    fn parse_ids(w: &str) -> Result<Vec<u32>, String> {
        if w == "-" {
            return Ok(Vec::new());
        }
        w.split(',')
            .map(|e| {
                e.parse::<u32>()
                    .map_err(|_| format!("expert id {:?} is not a u32", truncate(e, 16)))
            })
            .collect()
    }

    fn line(&self, verb: &str) -> String {
        format!(
            "{verb} {} {} {}",
            self.layer,
            Self::ids_text(&self.pinned),
            Self::ids_text(&self.tail)
        )
    }

    /// The plan as one or more command lines, each within [`MAX_LINE`]: a plan too long for
    /// one line is split, the first line replacing the layer's plan and the rest adding to it
    /// (`want+`).
    pub fn to_lines(&self) -> Vec<String> {
        let line = self.line("want");
        if line.len() <= MAX_LINE {
            return vec![line];
        }
        // 40 + 40 ids of up to 10 digits and their commas take at most 880 bytes.
        let mut lines = Vec::new();
        let chunks = |ids: &[u32]| ids.chunks(40).map(<[u32]>::to_vec).collect::<Vec<_>>();
        let (p, t) = (chunks(&self.pinned), chunks(&self.tail));
        for i in 0..p.len().max(t.len()) {
            let part = WantPlan {
                layer: self.layer,
                pinned: p.get(i).cloned().unwrap_or_default(),
                tail: t.get(i).cloned().unwrap_or_default(),
            };
            lines.push(part.line(if i == 0 { "want" } else { "want+" }));
        }
        lines
    }
}

/// Counters of the residency provider (the tap's side of the scheduler hook), reported for
/// `residency` and printed once when a process that ran the provider exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResidencyStats {
    /// Slots per expert layer the provider was configured with (0: provider off).
    pub slots: u32,
    /// Layers that hold slot memory now.
    pub layers: u32,
    /// Layers the supervisor has sent a plan for.
    pub planned: u32,
    /// Hook calls (one per host-resident expert tensor per graph split).
    pub calls: u64,
    /// Calls declined (the stock path copied): provider off, unknown tensor, no memory.
    pub declined: u64,
    /// Expert slices served from a resident slot (device to device).
    pub hits: u64,
    /// Expert slices copied from host memory into a slot, then served from it.
    pub loads: u64,
    /// Expert slices copied from host memory straight into the engine's buffer (not cached).
    pub streamed: u64,
    /// Slots given to another expert.
    pub evictions: u64,
    /// Bytes served device to device.
    pub bytes_hit: u64,
    /// Bytes copied from host memory (loads and streamed).
    pub bytes_host: u64,
    /// Host → device copy calls: one per run of consecutive experts not served from a slot.
    pub copies_host: u64,
    /// Device → device copy calls: slot → engine buffer (hits), engine buffer → slot (loads).
    pub copies_device: u64,
    /// Wide calls (a batch of many tokens: more than twice the model's top-k experts used),
    /// which admit only into free slots or over a lower plan level, and their hits, loads and
    /// streamed slices (included in the totals above).
    pub wide_calls: u64,
    pub wide_hits: u64,
    pub wide_loads: u64,
    pub wide_streamed: u64,
    /// Host → device copy calls one copy per loaded expert would have made (the provider before
    /// it batched runs): the "before" of `copies_host`.
    pub copies_host_unbatched: u64,
    /// Wall time spent inside the provider, in microseconds (enqueueing, not device time).
    pub provider_us: u64,
}

impl ResidencyStats {
    /// Every counter with its wire name, in wire order: the one list the text form, its readers
    /// and reports are built from.
    pub fn fields(&self) -> [(&'static str, u64); 19] {
        [
            ("slots", u64::from(self.slots)),
            ("layers", u64::from(self.layers)),
            ("planned", u64::from(self.planned)),
            ("calls", self.calls),
            ("declined", self.declined),
            ("hits", self.hits),
            ("loads", self.loads),
            ("streamed", self.streamed),
            ("evictions", self.evictions),
            ("bytes_hit", self.bytes_hit),
            ("bytes_host", self.bytes_host),
            ("copies_host", self.copies_host),
            ("copies_device", self.copies_device),
            ("wide_calls", self.wide_calls),
            ("wide_hits", self.wide_hits),
            ("wide_loads", self.wide_loads),
            ("wide_streamed", self.wide_streamed),
            ("copies_host_unbatched", self.copies_host_unbatched),
            ("provider_us", self.provider_us),
        ]
    }

    pub fn to_text(&self) -> String {
        self.fields()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn parse(text: &str) -> Result<ResidencyStats, String> {
        let kv = KeyValues::parse(text.split_ascii_whitespace())?;
        Ok(ResidencyStats {
            slots: kv.u32("slots")?,
            layers: kv.u32("layers")?,
            planned: kv.u32("planned")?,
            calls: kv.u64("calls")?,
            declined: kv.u64("declined")?,
            hits: kv.u64("hits")?,
            loads: kv.u64("loads")?,
            streamed: kv.u64("streamed")?,
            evictions: kv.u64("evictions")?,
            bytes_hit: kv.u64("bytes_hit")?,
            bytes_host: kv.u64("bytes_host")?,
            copies_host: kv.u64("copies_host")?,
            copies_device: kv.u64("copies_device")?,
            wide_calls: kv.u64("wide_calls")?,
            wide_hits: kv.u64("wide_hits")?,
            wide_loads: kv.u64("wide_loads")?,
            wide_streamed: kv.u64("wide_streamed")?,
            copies_host_unbatched: kv.u64("copies_host_unbatched")?,
            provider_us: kv.u64("provider_us")?,
        })
    }

    /// Expert slices served from slots without a host copy, over all slices served.
    pub fn hit_ratio(&self) -> Option<f64> {
        let all = self.hits + self.loads + self.streamed;
        (all > 0).then(|| self.hits as f64 / all as f64)
    }

    /// The hit ratio of narrow calls alone (decode: not wide).
    pub fn decode_hit_ratio(&self) -> Option<f64> {
        let hits = self.hits - self.wide_hits.min(self.hits);
        let all = hits
            + self.loads.saturating_sub(self.wide_loads)
            + self.streamed.saturating_sub(self.wide_streamed);
        (all > 0).then(|| hits as f64 / all as f64)
    }
}

/// Layers the tap keeps counters of one by one; slices of layers past it are added up in
/// [`ResidencyLayers::other`]. (No model llama.cpp runs has this many.)
pub const RESIDENCY_TABLE_LAYERS: usize = 1024;

/// The residency provider's counters of one layer (or of several, added up): the part of
/// [`ResidencyStats`] that is counted per layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerCounters {
    pub hits: u64,
    pub loads: u64,
    pub streamed: u64,
    pub evictions: u64,
    pub bytes_hit: u64,
    pub bytes_host: u64,
}

impl LayerCounters {
    /// Counters on the wire, in this order: `hits,loads,streamed,evictions,bytes_hit,bytes_host`.
    pub const FIELDS: usize = 6;

    pub fn to_array(&self) -> [u64; Self::FIELDS] {
        [
            self.hits,
            self.loads,
            self.streamed,
            self.evictions,
            self.bytes_hit,
            self.bytes_host,
        ]
    }

    pub fn from_array(v: [u64; Self::FIELDS]) -> LayerCounters {
        let [hits, loads, streamed, evictions, bytes_hit, bytes_host] = v;
        LayerCounters {
            hits,
            loads,
            streamed,
            evictions,
            bytes_hit,
            bytes_host,
        }
    }

    /// The per-layer part of the provider's totals.
    pub fn of_totals(r: &ResidencyStats) -> LayerCounters {
        LayerCounters {
            hits: r.hits,
            loads: r.loads,
            streamed: r.streamed,
            evictions: r.evictions,
            bytes_hit: r.bytes_hit,
            bytes_host: r.bytes_host,
        }
    }

    pub fn is_zero(&self) -> bool {
        self.to_array() == [0; Self::FIELDS]
    }

    /// Field by field; `None` when a sum would overflow.
    pub fn checked_add(&self, o: &LayerCounters) -> Option<LayerCounters> {
        let (a, b) = (self.to_array(), o.to_array());
        let mut v = [0u64; Self::FIELDS];
        for i in 0..Self::FIELDS {
            v[i] = a[i].checked_add(b[i])?;
        }
        Some(LayerCounters::from_array(v))
    }

    pub fn saturating_add(&self, o: &LayerCounters) -> LayerCounters {
        let (a, b) = (self.to_array(), o.to_array());
        LayerCounters::from_array(std::array::from_fn(|i| a[i].saturating_add(b[i])))
    }

    /// Slices served from slots without a host copy, over all slices served.
    pub fn hit_ratio(&self) -> Option<f64> {
        let all = self.hits + self.loads + self.streamed;
        (all > 0).then(|| self.hits as f64 / all as f64)
    }

    fn text(&self) -> String {
        let mut s = String::new();
        for (i, v) in self.to_array().iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{v}");
        }
        s
    }

    fn parse_text(what: &str, t: &str) -> Result<LayerCounters, String> {
        let mut v = [0u64; Self::FIELDS];
        let mut parts = t.split(',');
        for slot in &mut v {
            let p = parts
                .next()
                .ok_or_else(|| format!("{what} has fewer than {} counters", Self::FIELDS))?;
            *slot = p.parse().map_err(|_| {
                format!(
                    "{what}: {:?} is not a non-negative integer",
                    truncate(p, 24)
                )
            })?;
        }
        if parts.next().is_some() {
            return Err(format!("{what} has more than {} counters", Self::FIELDS));
        }
        Ok(LayerCounters::from_array(v))
    }
}

/// One snapshot of the provider's counters per layer, taken at once with their totals (so the
/// layers add up to them exactly): what `residency layers` pages through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResidencyLayers {
    /// Which update of the counters the snapshot shows (the tap counts its updates); every page
    /// of one read carries the same.
    pub seq: u64,
    /// The totals of the same snapshot: the layers plus `other`, field by field.
    pub totals: LayerCounters,
    /// Layers at or past [`RESIDENCY_TABLE_LAYERS`], added up.
    pub other: LayerCounters,
    /// Every layer with a non-zero counter, ascending.
    pub layers: Vec<(u32, LayerCounters)>,
}

/// One `residency layers` reply: a snapshot's header and the layers that fit in one line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayersPage {
    pub seq: u64,
    pub totals: LayerCounters,
    pub other: LayerCounters,
    pub layers: Vec<(u32, LayerCounters)>,
    /// Where the next page starts (`residency layers <next>`); `None` on the last page.
    pub next: Option<u32>,
}

impl ResidencyLayers {
    /// The page from layer `from` on: as many layers as fit in one reply line.
    pub fn page(&self, from: u32) -> LayersPage {
        let mut page = LayersPage {
            seq: self.seq,
            totals: self.totals,
            other: self.other,
            layers: Vec::new(),
            next: None,
        };
        // Room left after "ok " and the header with the longest `next`.
        let header = LayersPage {
            next: Some(u32::MAX),
            ..page.clone()
        };
        let mut room = MAX_LINE - 3 - header.to_text().len();
        for &(l, c) in self.layers.iter().filter(|(l, _)| *l >= from) {
            let len = format!(" {l}={}", c.text()).len();
            if len > room {
                page.next = Some(l);
                break;
            }
            room -= len;
            page.layers.push((l, c));
        }
        page
    }
}

impl LayersPage {
    pub fn to_text(&self) -> String {
        let mut s = format!("seq={} next=", self.seq);
        match self.next {
            Some(n) => {
                let _ = write!(s, "{n}");
            }
            None => s.push('-'),
        }
        let _ = write!(
            s,
            " totals={} other={}",
            self.totals.text(),
            self.other.text()
        );
        for (l, c) in &self.layers {
            let _ = write!(s, " {l}={}", c.text());
        }
        s
    }

    /// Parses one reply's text. Checks the form only; [`LayersReader`] checks the pages
    /// against each other and the layers against the totals.
    pub fn parse(text: &str) -> Result<LayersPage, String> {
        let kv = KeyValues::parse(text.split_ascii_whitespace())?;
        let seq = kv.u64("seq")?;
        let next = match kv.get("next")? {
            "-" => None,
            n => Some(
                n.parse::<u32>()
                    .map_err(|_| format!("next={} is not a layer", truncate(n, 16)))?,
            ),
        };
        let totals = LayerCounters::parse_text("totals", kv.get("totals")?)?;
        let other = LayerCounters::parse_text("other", kv.get("other")?)?;
        let mut layers = Vec::new();
        for &(k, v) in &kv.0 {
            if k.starts_with(|c: char| c.is_ascii_digit()) {
                let l = k
                    .parse::<u32>()
                    .map_err(|_| format!("layer {:?} is not a u32", truncate(k, 16)))?;
                layers.push((l, LayerCounters::parse_text(&format!("layer {l}"), v)?));
            }
        }
        Ok(LayersPage {
            seq,
            totals,
            other,
            layers,
            next,
        })
    }
}

/// The supervisor's side of a `residency layers` read: takes the pages in order and checks
/// what the tap (untrusted) sent — every page of one snapshot, layers ascending and below
/// the model's layer count, pages that move forward, at most one page per layer, and layers
/// that add up to the totals. A violation is an error message, never a panic.
#[derive(Debug)]
pub struct LayersReader {
    n_layer: u32,
    from: u32,
    pages: u32,
    got: Option<ResidencyLayers>,
    done: bool,
}

impl LayersReader {
    /// A read of a model with `n_layer` layers.
    pub fn new(n_layer: u32) -> LayersReader {
        LayersReader {
            n_layer,
            from: 0,
            pages: 0,
            got: None,
            done: false,
        }
    }

    /// The command for the next page, `None` once the last page has been taken.
    pub fn command(&self) -> Option<Command> {
        (!self.done).then_some(Command::ResidencyLayers { from: self.from })
    }

    /// Takes the reply text to [`command`](Self::command).
    pub fn take(&mut self, text: &str) -> Result<(), String> {
        if self.done {
            return Err("a page after the last one".into());
        }
        let page = LayersPage::parse(text)?;
        self.pages += 1;
        if self.pages > self.n_layer.saturating_add(1) {
            return Err(format!(
                "more pages than the model's {} layers",
                self.n_layer
            ));
        }
        let got = self.got.get_or_insert_with(|| ResidencyLayers {
            seq: page.seq,
            totals: page.totals,
            other: page.other,
            layers: Vec::new(),
        });
        if (got.seq, got.totals, got.other) != (page.seq, page.totals, page.other) {
            return Err(format!(
                "the page from layer {} is of another snapshot (seq {} after {})",
                self.from, page.seq, got.seq
            ));
        }
        for &(l, c) in &page.layers {
            if l < self.from || got.layers.last().is_some_and(|&(p, _)| l <= p) {
                return Err(format!(
                    "layer {l} out of order in the page from layer {}",
                    self.from
                ));
            }
            if l >= self.n_layer {
                return Err(format!("layer {l} of a model with {} layers", self.n_layer));
            }
            got.layers.push((l, c));
        }
        match page.next {
            None => self.done = true,
            Some(n) if n > self.from && n < self.n_layer => self.from = n,
            Some(n) => {
                return Err(format!(
                    "next page from layer {n} after the page from layer {} (model of {} layers)",
                    self.from, self.n_layer
                ))
            }
        }
        Ok(())
    }

    /// The snapshot, once every page is in and the layers add up to the totals.
    pub fn finish(self) -> Result<ResidencyLayers, String> {
        let got = match (self.done, self.got) {
            (true, Some(g)) => g,
            _ => return Err("the read ended before its last page".into()),
        };
        let sum = got
            .layers
            .iter()
            .try_fold(got.other, |acc, (_, c)| acc.checked_add(c))
            .ok_or("the layers' counters overflow when added up")?;
        if sum != got.totals {
            return Err(format!(
                "the layers add up to {} but the totals are {} (hits,loads,streamed,evictions,bytes_hit,bytes_host)",
                sum.text(),
                got.totals.text()
            ));
        }
        Ok(got)
    }
}

/// Prefix of the line a process that ran the provider prints on its stderr at exit.
pub const RESIDENCY_EXIT_PREFIX: &str = "spark-tap: residency ";

/// Error codes of `err` replies.
pub const ERR_UNKNOWN_VERB: &str = "unknown-verb";
pub const ERR_BAD_ARGS: &str = "bad-args";
pub const ERR_TOO_LONG: &str = "too-long";
pub const ERR_UNAVAILABLE: &str = "unavailable";

/// A reply line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok(String),
    Err { code: String, message: String },
}

impl Reply {
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply::Ok(text.into())
    }

    pub fn err(code: &str, message: impl Into<String>) -> Reply {
        Reply::Err {
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn to_line(&self) -> String {
        match self {
            Reply::Ok(t) if t.is_empty() => "ok".to_string(),
            Reply::Ok(t) => format!("ok {t}"),
            Reply::Err { code, message } => format!("err {code} {message}"),
        }
    }

    pub fn parse(line: &str) -> Result<Reply, String> {
        if line == "ok" {
            return Ok(Reply::Ok(String::new()));
        }
        if let Some(t) = line.strip_prefix("ok ") {
            return Ok(Reply::Ok(t.to_string()));
        }
        if let Some(rest) = line.strip_prefix("err ") {
            let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
            return Ok(Reply::err(code, message));
        }
        Err(format!("not a reply line: {line:?}"))
    }
}

impl Command {
    pub fn to_line(&self) -> String {
        match self {
            Command::Stats => "stats".into(),
            Command::Flush => "flush".into(),
            Command::Reset => "reset".into(),
            Command::Quit => "quit".into(),
            Command::Request(n) => format!("request {n}"),
            Command::Hidden(None) => "hidden off".into(),
            Command::Hidden(Some(h)) => format!(
                "hidden on every={} budget={} tensor={}",
                h.every,
                h.budget_mib,
                h.tensor.name()
            ),
            Command::Residency => "residency".into(),
            Command::ResidencyLayers { from: 0 } => "residency layers".into(),
            Command::ResidencyLayers { from } => format!("residency layers {from}"),
            Command::Want(p) => p.line("want"),
            Command::WantMore(p) => p.line("want+"),
        }
    }

    /// Parses one command line; the error is the reply to send.
    pub fn parse(line: &str) -> Result<Command, Reply> {
        if line.len() > MAX_LINE {
            return Err(Reply::err(
                ERR_TOO_LONG,
                format!("line of {} bytes exceeds {MAX_LINE}", line.len()),
            ));
        }
        let mut words = line.split_ascii_whitespace();
        let verb = words.next().unwrap_or("");
        let rest: Vec<&str> = words.collect();
        let bad = |m: String| Err(Reply::err(ERR_BAD_ARGS, m));
        let no_args = |c: Command| {
            if rest.is_empty() {
                Ok(c)
            } else {
                bad(format!("{verb} takes no arguments"))
            }
        };
        match verb {
            "stats" => no_args(Command::Stats),
            "flush" => no_args(Command::Flush),
            "reset" => no_args(Command::Reset),
            "quit" => no_args(Command::Quit),
            "request" => match rest.as_slice() {
                [n] => match n.parse() {
                    Ok(n) => Ok(Command::Request(n)),
                    Err(_) => bad(format!("request id {n:?} is not a u32")),
                },
                _ => bad("usage: request <id>".into()),
            },
            "hidden" => match rest.split_first() {
                Some((&"off", [])) => Ok(Command::Hidden(None)),
                Some((&"on", args)) => {
                    let kv = KeyValues::parse(args.iter().copied())
                        .map_err(|m| Reply::err(ERR_BAD_ARGS, m))?;
                    let every = kv.u32("every").unwrap_or(1);
                    let budget_mib = kv.u32("budget").unwrap_or(64);
                    let tensor = match kv.get("tensor") {
                        Ok(t) => match HiddenTensor::parse(t) {
                            Some(t) => t,
                            None => {
                                return bad(format!(
                                    "tensor={t} is not ffn_norm, attn_norm or router_input"
                                ))
                            }
                        },
                        Err(_) => HiddenTensor::FfnNorm,
                    };
                    if let Some(k) = kv.unknown(&["every", "budget", "tensor"]) {
                        return bad(format!("unknown key {k}"));
                    }
                    if every == 0 || budget_mib == 0 {
                        return bad("every and budget must be at least 1".into());
                    }
                    Ok(Command::Hidden(Some(HiddenConfig {
                        every,
                        budget_mib,
                        tensor,
                    })))
                }
                _ => bad("usage: hidden off | hidden on every=N budget=MiB tensor=NAME".into()),
            },
            "residency" => match rest.as_slice() {
                [] => Ok(Command::Residency),
                ["layers"] => Ok(Command::ResidencyLayers { from: 0 }),
                ["layers", from] => match from.parse() {
                    Ok(from) => Ok(Command::ResidencyLayers { from }),
                    Err(_) => bad(format!("layer {:?} is not a u32", truncate(from, 16))),
                },
                _ => bad("usage: residency | residency layers [<from layer>]".into()),
            },
            "want" | "want+" => match rest.as_slice() {
                [layer, pinned, tail] => {
                    let layer = match layer.parse() {
                        Ok(l) => l,
                        Err(_) => return bad(format!("layer {layer:?} is not a u32")),
                    };
                    let parse =
                        |w: &str| WantPlan::parse_ids(w).map_err(|m| Reply::err(ERR_BAD_ARGS, m));
                    let plan = WantPlan {
                        layer,
                        pinned: parse(pinned)?,
                        tail: parse(tail)?,
                    };
                    if verb == "want" {
                        Ok(Command::Want(plan))
                    } else {
                        Ok(Command::WantMore(plan))
                    }
                }
                _ => bad(format!("usage: {verb} <layer> <pinned ids|-> <tail ids|->")),
            },
            "" => Err(Reply::err(ERR_UNKNOWN_VERB, "empty line")),
            other => Err(Reply::err(
                ERR_UNKNOWN_VERB,
                format!("unknown verb {:?}", truncate(other, 64)),
            )),
        }
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Counters the tap reports for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Routing records published into the ring.
    pub records: u64,
    /// Records dropped (ring full or capture scratch too small).
    pub dropped: u64,
    /// MoE layers seen in the graph so far (0 for a dense model).
    pub moe_layers: u32,
    /// Graph evaluations (ubatches) seen.
    pub ubatches: u64,
    /// Hidden-state bytes captured.
    pub hidden_bytes: u64,
    /// Records whose token position could not be attributed.
    pub unmapped: u64,
    /// Graphs whose routing was read once after the graph (hooked engine's graph observer),
    /// with no synchronisation per layer; the others were read by the eval callback.
    pub graph_reads: u64,
    /// Hidden-state rows (router inputs) read after their graph by the graph observer rather
    /// than by the eval callback. Absent from an older tap's reply: 0.
    pub graph_hidden_rows: u64,
}

impl TapStats {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "records={} dropped={} moe_layers={} ubatches={} hidden_bytes={} unmapped={} \
             graph_reads={} graph_hidden_rows={}",
            self.records,
            self.dropped,
            self.moe_layers,
            self.ubatches,
            self.hidden_bytes,
            self.unmapped,
            self.graph_reads,
            self.graph_hidden_rows
        );
        s
    }

    pub fn parse(text: &str) -> Result<TapStats, String> {
        let kv = KeyValues::parse(text.split_ascii_whitespace())?;
        Ok(TapStats {
            records: kv.u64("records")?,
            dropped: kv.u64("dropped")?,
            moe_layers: kv.u32("moe_layers")?,
            ubatches: kv.u64("ubatches")?,
            hidden_bytes: kv.u64("hidden_bytes")?,
            unmapped: kv.u64("unmapped")?,
            graph_reads: kv.u64("graph_reads")?,
            graph_hidden_rows: if kv.get("graph_hidden_rows").is_ok() {
                kv.u64("graph_hidden_rows")?
            } else {
                0
            },
        })
    }
}

/// What the tap does for each command; [`respond`] maps lines to these calls.
pub trait TapControl {
    fn stats(&mut self) -> TapStats;
    fn flush(&mut self) -> u64;
    fn reset(&mut self);
    fn set_request(&mut self, id: u32);
    /// Returns an error message when hidden capture cannot be switched on.
    fn set_hidden(&mut self, cfg: Option<HiddenConfig>) -> Result<(), String>;
    /// The residency provider's counters.
    fn residency(&mut self) -> ResidencyStats;
    /// The provider's counters per layer: a fresh snapshot when `fresh`, else the one taken
    /// last (the pages of one read come from one snapshot). The error says why there is none.
    fn residency_layers(&mut self, fresh: bool) -> Result<ResidencyLayers, String>;
    /// Sets (or, with `append`, extends) one layer's residency plan; the error says why the
    /// plan cannot be taken (no provider, layer or expert out of range).
    fn want(&mut self, plan: &WantPlan, append: bool) -> Result<(), String>;
}

/// Outcome of one command line.
pub struct Response {
    pub reply: Reply,
    /// The session ends after this reply.
    pub quit: bool,
}

/// Parses `line`, applies it to `tap`, and returns the reply.
pub fn respond(line: &str, tap: &mut dyn TapControl) -> Response {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let cmd = match Command::parse(line) {
        Ok(c) => c,
        Err(reply) => return Response { reply, quit: false },
    };
    let reply = match cmd {
        Command::Stats => Reply::ok(tap.stats().to_text()),
        Command::Flush => Reply::ok(format!("records={}", tap.flush())),
        Command::Reset => {
            tap.reset();
            Reply::ok("")
        }
        Command::Quit => {
            return Response {
                reply: Reply::ok("bye"),
                quit: true,
            }
        }
        Command::Request(n) => {
            tap.set_request(n);
            Reply::ok(format!("request={n}"))
        }
        Command::Hidden(cfg) => match tap.set_hidden(cfg) {
            Ok(()) => Reply::ok(match cfg {
                None => "hidden=off".to_string(),
                Some(h) => format!(
                    "hidden=on every={} budget={} tensor={}",
                    h.every,
                    h.budget_mib,
                    h.tensor.name()
                ),
            }),
            Err(m) => Reply::err(ERR_UNAVAILABLE, m),
        },
        Command::Residency => Reply::ok(tap.residency().to_text()),
        Command::ResidencyLayers { from } => match tap.residency_layers(from == 0) {
            Ok(snapshot) => Reply::ok(snapshot.page(from).to_text()),
            Err(m) => Reply::err(ERR_UNAVAILABLE, m),
        },
        Command::Want(ref p) | Command::WantMore(ref p) => {
            let append = matches!(cmd, Command::WantMore(_));
            match tap.want(p, append) {
                Ok(()) => Reply::ok(format!(
                    "layer={} pinned={} tail={}",
                    p.layer,
                    p.pinned.len(),
                    p.tail.len()
                )),
                Err(m) => Reply::err(ERR_UNAVAILABLE, m),
            }
        }
    };
    Response { reply, quit: false }
}

/// `key=value` words.
struct KeyValues<'a>(Vec<(&'a str, &'a str)>);

impl<'a> KeyValues<'a> {
    fn parse(words: impl Iterator<Item = &'a str>) -> Result<KeyValues<'a>, String> {
        let mut v = Vec::new();
        for w in words {
            let (k, val) = w
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {:?}", truncate(w, 64)))?;
            v.push((k, val));
        }
        Ok(KeyValues(v))
    }

    fn get(&self, key: &str) -> Result<&'a str, String> {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("missing {key}="))
    }

    fn u64(&self, key: &str) -> Result<u64, String> {
        let v = self.get(key)?;
        v.parse()
            .map_err(|_| format!("{key}={v} is not a non-negative integer"))
    }

    fn u32(&self, key: &str) -> Result<u32, String> {
        let v = self.get(key)?;
        v.parse()
            .map_err(|_| format!("{key}={v} is not a non-negative integer"))
    }

    fn unknown(&self, known: &[&str]) -> Option<&'a str> {
        self.0.iter().map(|(k, _)| *k).find(|k| !known.contains(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tap stand-in that records what it was told.
    #[derive(Default)]
    struct FakeTap {
        request: u32,
        hidden: Option<HiddenConfig>,
        records: u64,
        planned: Vec<u32>,
    }

    impl TapControl for FakeTap {
        fn stats(&mut self) -> TapStats {
            TapStats {
                records: self.records,
                dropped: 2,
                moe_layers: 4,
                ubatches: 7,
                hidden_bytes: 0,
                unmapped: 0,
                graph_reads: 0,
                graph_hidden_rows: 0,
            }
        }
        fn flush(&mut self) -> u64 {
            self.records
        }
        fn reset(&mut self) {
            self.records = 0;
        }
        fn set_request(&mut self, id: u32) {
            self.request = id;
            self.records += 10;
        }
        fn set_hidden(&mut self, cfg: Option<HiddenConfig>) -> Result<(), String> {
            self.hidden = cfg;
            Ok(())
        }
        fn residency(&mut self) -> ResidencyStats {
            ResidencyStats {
                slots: 4,
                planned: self.planned.len() as u32,
                ..ResidencyStats::default()
            }
        }
        fn residency_layers(&mut self, _fresh: bool) -> Result<ResidencyLayers, String> {
            Ok(fake_layers())
        }
        fn want(&mut self, plan: &WantPlan, append: bool) -> Result<(), String> {
            if plan.layer >= 4 {
                return Err(format!("layer {} of a model with 4 layers", plan.layer));
            }
            if !append || !self.planned.contains(&plan.layer) {
                self.planned.push(plan.layer);
            }
            Ok(())
        }
    }

    /// Layers 0 and 2 of 4 served something; they add up to the totals.
    fn fake_layers() -> ResidencyLayers {
        let c = |v| LayerCounters::from_array(v);
        ResidencyLayers {
            seq: 3,
            totals: c([7, 2, 1, 1, 700, 300]),
            other: LayerCounters::default(),
            layers: vec![
                (0, c([4, 1, 1, 1, 400, 200])),
                (2, c([3, 1, 0, 0, 300, 100])),
            ],
        }
    }

    /// Replays a golden transcript: `> ` lines are sent, `< ` lines are the expected replies,
    /// `#` lines are comments.
    fn replay(transcript: &str) {
        let mut tap = FakeTap::default();
        let mut expected = Vec::new();
        let mut got = Vec::new();
        let mut quit = false;
        for line in transcript.lines() {
            if let Some(cmd) = line.strip_prefix("> ") {
                assert!(!quit, "command after quit: {cmd}");
                let r = respond(cmd, &mut tap);
                got.push(r.reply.to_line());
                quit = r.quit;
            } else if let Some(rep) = line.strip_prefix("< ") {
                expected.push(rep.to_string());
            }
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn golden_session() {
        replay(include_str!("../golden/control-session.txt"));
    }

    #[test]
    fn golden_errors() {
        replay(include_str!("../golden/control-errors.txt"));
    }

    #[test]
    fn a_long_plan_is_split_into_lines_that_parse_back_to_it() {
        let plan = WantPlan {
            layer: 47,
            pinned: (100_000..100_200).collect(),
            tail: (200_000..200_300).collect(),
        };
        let lines = plan.to_lines();
        assert!(lines.len() > 1);
        let mut got = WantPlan {
            layer: 47,
            ..WantPlan::default()
        };
        for (i, l) in lines.iter().enumerate() {
            assert!(l.len() <= MAX_LINE, "line {i} has {} bytes", l.len());
            match Command::parse(l).unwrap() {
                Command::Want(p) if i == 0 => {
                    got.pinned.extend(p.pinned);
                    got.tail.extend(p.tail);
                }
                Command::WantMore(p) if i > 0 => {
                    got.pinned.extend(p.pinned);
                    got.tail.extend(p.tail);
                }
                other => panic!("line {i} parsed as {other:?}"),
            }
        }
        assert_eq!(got, plan);
        let short = WantPlan {
            layer: 0,
            pinned: vec![],
            tail: vec![5],
        };
        assert_eq!(short.to_lines(), vec!["want 0 - 5".to_string()]);
    }

    #[test]
    fn greeting_round_trips() {
        let g = Greeting {
            version: CONTROL_VERSION,
            arch: "qwen3moe".into(),
            n_layer: 48,
            n_expert: 128,
            n_expert_used: 8,
            n_embd: 2048,
        };
        assert_eq!(Greeting::parse(&g.to_line()).unwrap(), g);
        assert!(Greeting::parse(
            "spark-tap 2 arch=x n_layer=1 n_expert=1 n_expert_used=1 n_embd=1"
        )
        .unwrap_err()
        .contains("protocol 2"));
        assert!(Greeting::parse("hello").is_err());
    }

    #[test]
    fn commands_round_trip() {
        for c in [
            Command::Stats,
            Command::Flush,
            Command::Reset,
            Command::Quit,
            Command::Request(42),
            Command::Hidden(None),
            Command::Hidden(Some(HiddenConfig {
                every: 4,
                budget_mib: 16,
                tensor: HiddenTensor::AttnNorm,
            })),
            Command::Residency,
            Command::ResidencyLayers { from: 0 },
            Command::ResidencyLayers { from: 12 },
            Command::Want(WantPlan {
                layer: 3,
                pinned: vec![1, 2],
                tail: vec![],
            }),
            Command::WantMore(WantPlan {
                layer: 3,
                pinned: vec![],
                tail: vec![9],
            }),
        ] {
            assert_eq!(Command::parse(&c.to_line()).unwrap(), c);
        }
        let s = TapStats {
            records: 1,
            dropped: 2,
            moe_layers: 3,
            ubatches: 4,
            hidden_bytes: 5,
            unmapped: 6,
            graph_reads: 7,
            graph_hidden_rows: 8,
        };
        assert_eq!(TapStats::parse(&s.to_text()).unwrap(), s);
        // An older tap says nothing of router inputs read after the graph.
        let old =
            "records=1 dropped=2 moe_layers=3 ubatches=4 hidden_bytes=5 unmapped=6 graph_reads=7";
        assert_eq!(
            TapStats::parse(old).unwrap(),
            TapStats {
                graph_hidden_rows: 0,
                ..s
            }
        );
        assert!(TapStats::parse(&format!("{old} graph_hidden_rows=x")).is_err());
        let r = ResidencyStats {
            slots: 1,
            layers: 2,
            planned: 3,
            calls: 4,
            declined: 5,
            hits: 6,
            loads: 7,
            streamed: 8,
            evictions: 9,
            bytes_hit: 10,
            bytes_host: 11,
            copies_host: 13,
            copies_device: 14,
            wide_calls: 15,
            wide_hits: 2,
            wide_loads: 3,
            wide_streamed: 4,
            copies_host_unbatched: 16,
            provider_us: 12,
        };
        assert_eq!(ResidencyStats::parse(&r.to_text()).unwrap(), r);
        assert_eq!(r.hit_ratio(), Some(6.0 / 21.0));
        // decode alone: 4 hits of 4 + 4 + 4
        assert_eq!(r.decode_hit_ratio(), Some(4.0 / 12.0));
        for r in [
            Reply::ok(""),
            Reply::ok("a b"),
            Reply::err("bad-args", "x y"),
        ] {
            assert_eq!(Reply::parse(&r.to_line()).unwrap(), r);
        }
    }

    /// A big snapshot (94 layers, counters near u64::MAX) pages into lines within MAX_LINE
    /// that parse and read back to the same snapshot.
    #[test]
    fn layer_pages_fit_a_line_and_read_back_to_the_snapshot() {
        let big = |l: u64| {
            LayerCounters::from_array(std::array::from_fn(|i| u64::MAX / 200 + l * 7 + i as u64))
        };
        let layers: Vec<(u32, LayerCounters)> = (0..94u32)
            .filter(|l| l % 5 != 3)
            .map(|l| (l, big(u64::from(l))))
            .collect();
        let totals = layers.iter().fold(LayerCounters::default(), |a, (_, c)| {
            a.checked_add(c).unwrap()
        });
        let snap = ResidencyLayers {
            seq: u64::MAX,
            totals,
            other: LayerCounters::default(),
            layers,
        };
        let mut tap = FakeSnapshot(snap.clone());
        let mut reader = LayersReader::new(94);
        let mut pages = 0;
        while let Some(cmd) = reader.command() {
            let line = respond(&cmd.to_line(), &mut tap).reply.to_line();
            assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
            let Reply::Ok(text) = Reply::parse(&line).unwrap() else {
                panic!("{line}")
            };
            assert_eq!(LayersPage::parse(&text).unwrap().to_text(), text);
            reader.take(&text).unwrap();
            pages += 1;
        }
        assert!(pages > 10, "{pages} pages");
        assert_eq!(reader.finish().unwrap(), snap);

        // The fake's small snapshot: one page.
        let mut reader = LayersReader::new(4);
        reader.take(&fake_layers().page(0).to_text()).unwrap();
        assert_eq!(reader.command(), None);
        assert_eq!(reader.finish().unwrap(), fake_layers());
        assert_eq!(
            Command::parse("residency layers 7").unwrap(),
            Command::ResidencyLayers { from: 7 }
        );
    }

    struct FakeSnapshot(ResidencyLayers);

    impl TapControl for FakeSnapshot {
        fn stats(&mut self) -> TapStats {
            TapStats::default()
        }
        fn flush(&mut self) -> u64 {
            0
        }
        fn reset(&mut self) {}
        fn set_request(&mut self, _: u32) {}
        fn set_hidden(&mut self, _: Option<HiddenConfig>) -> Result<(), String> {
            Ok(())
        }
        fn residency(&mut self) -> ResidencyStats {
            ResidencyStats::default()
        }
        fn residency_layers(&mut self, _: bool) -> Result<ResidencyLayers, String> {
            Ok(self.0.clone())
        }
        fn want(&mut self, _: &WantPlan, _: bool) -> Result<(), String> {
            Ok(())
        }
    }

    /// What an untrusted tap may send instead: each is refused with a message, none panics.
    #[test]
    fn the_reader_refuses_pages_that_do_not_add_up_or_do_not_move_forward() {
        let page = |next: &str, layers: &str| {
            format!("seq=3 next={next} totals=7,2,1,1,700,300 other=0,0,0,0,0,0 {layers}")
        };
        let ok_layers = "0=4,1,1,1,400,200 2=3,1,0,0,300,100";
        let refused = |pages: &[String], n_layer: u32, why: &str| {
            let mut r = LayersReader::new(n_layer);
            let mut err = None;
            for p in pages {
                if let Err(e) = r.take(p) {
                    err = Some(e);
                    break;
                }
            }
            let err = match err {
                Some(e) => e,
                None => r.finish().unwrap_err(),
            };
            assert!(err.contains(why), "{pages:?}: {err:?} lacks {why:?}");
        };
        // Well formed, for contrast.
        let mut r = LayersReader::new(4);
        r.take(&page("-", ok_layers)).unwrap();
        r.finish().unwrap();

        refused(&[page("-", "0=4,1,1,1,400,200")], 4, "add up to");
        refused(
            &[page("-", "0=4,1,1,1,400,200 2=3,1,0,0,300,101")],
            4,
            "add up to",
        );
        refused(
            &[page("-", "2=3,1,0,0,300,100 0=4,1,1,1,400,200")],
            4,
            "out of order",
        );
        refused(
            &[page("-", "0=4,1,1,1,400,200 0=3,1,0,0,300,100")],
            4,
            "out of order",
        );
        refused(&[page("-", ok_layers)], 2, "of a model with 2 layers");
        refused(
            &[page("-", "0=4,1,1,1,400 2=3,1,0,0,300,100")],
            4,
            "fewer than 6",
        );
        refused(
            &[page("-", "0=4,1,1,1,400,200,9 2=3,1,0,0,300,100")],
            4,
            "more than 6",
        );
        refused(
            &[page("-", "0=4,1,x,1,400,200 2=3,1,0,0,300,100")],
            4,
            "not a non-negative",
        );
        refused(&[page("-", "0=4,1,-1,1,400,200")], 4, "not a non-negative");
        refused(&[page("-", "99999999999=4,1,1,1,400,200")], 4, "not a u32");
        refused(
            &["seq=3 next=- other=0,0,0,0,0,0".to_string()],
            4,
            "missing totals=",
        );
        refused(&[page("x", ok_layers)], 4, "not a layer");
        // Pages that do not move forward, or go past the model.
        refused(&[page("0", "")], 4, "next page from layer 0");
        refused(
            &[page("2", "0=4,1,1,1,400,200"), page("2", "")],
            4,
            "next page from layer 2",
        );
        refused(&[page("9", "")], 4, "next page from layer 9");
        // A page of another snapshot.
        let other_seq = page("-", "2=3,1,0,0,300,100").replacen("seq=3", "seq=4", 1);
        refused(
            &[page("1", "0=4,1,1,1,400,200"), other_seq],
            4,
            "another snapshot",
        );
        // Stopping early.
        refused(&[page("1", "0=4,1,1,1,400,200")], 4, "before its last page");
        // Counters that overflow when added up.
        let m = u64::MAX;
        refused(
            &[format!(
                "seq=1 next=- totals=0,0,0,0,0,0 other=0,0,0,0,0,0 0={m},0,0,0,0,0 1={m},0,0,0,0,0"
            )],
            4,
            "overflow",
        );
    }
}
