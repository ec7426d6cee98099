//! Profiles across a fleet: `spark profile merge` adds the routing counts of several machines'
//! profiles of one model into one profile (optionally weighted), and `spark profile diff` says
//! how far two machines' routing differs (per-layer overlap of the hot sets, and the hit ratio
//! one machine's hot set gets on the other's counts).
//!
//! Owns only the arithmetic and its report; reading and writing the file is
//! [`crate::profile`]'s. Never merges profiles of different models: every input must carry the
//! same model fingerprint and the same geometry, or the merge is refused naming the file. Counts
//! are added in 128 bits and, when the sum would pass [`MAX_TOTAL`], halved together until it
//! fits (ratios kept, said in the report), so a merge never overflows or wraps.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cache::Counts;
use crate::profile::{Profile, ProfileError, MAX_TOTAL};

/// One input of a merge: its file, what was read from it, and its weight.
pub struct MergeInput {
    pub path: PathBuf,
    pub profile: Profile,
    pub weight: f64,
}

/// A merged profile and how it was made.
#[derive(Debug)]
pub struct Merged {
    pub profile: Profile,
    /// The merged counts were halved this many times to fit [`MAX_TOTAL`] (0: exact sums).
    pub halvings: u32,
}

fn merge_err(path: &Path, msg: impl Into<String>) -> ProfileError {
    ProfileError::Combine {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Checks that every profile is of the first one's model: same fingerprint (present in each)
/// and same geometry. `what` names the command in the message.
fn same_model<'a>(
    what: &str,
    inputs: impl IntoIterator<Item = (&'a Path, &'a Profile)>,
) -> Result<(), ProfileError> {
    let mut first: Option<(&Path, &Profile)> = None;
    for (path, p) in inputs {
        let Some(fp) = &p.fingerprint else {
            return Err(merge_err(
                path,
                format!("it has no model fingerprint line, so nothing proves it is of the same model; {what} needs profiles written by spark (serve --spark, calibrate, profile merge)"),
            ));
        };
        let Some((fpath, f)) = first else {
            first = Some((path, p));
            continue;
        };
        let ffp = f.fingerprint.as_deref().unwrap_or_default();
        if fp != ffp {
            return Err(merge_err(
                path,
                format!(
                    "it was made for model {fp}, {} for model {ffp}; {what} takes profiles of one model only",
                    fpath.display()
                ),
            ));
        }
        if (p.n_layer(), p.n_expert(), p.n_expert_used)
            != (f.n_layer(), f.n_expert(), f.n_expert_used)
        {
            return Err(merge_err(
                path,
                format!(
                    "its geometry {} layers × {} experts, k={} differs from {} ({} × {}, k={})",
                    p.n_layer(),
                    p.n_expert(),
                    p.n_expert_used,
                    fpath.display(),
                    f.n_layer(),
                    f.n_expert(),
                    f.n_expert_used
                ),
            ));
        }
    }
    Ok(())
}

/// `count × weight`, exact for weight 1 (the common case), rounded otherwise.
fn weighted(count: u64, weight: f64) -> u128 {
    if weight == 1.0 {
        u128::from(count)
    } else {
        // Finite and non-negative (checked by `merge`); `as` saturates at u128::MAX.
        (count as f64 * weight).round() as u128
    }
}

/// Adds the counts of `inputs` (each times its weight). Every input must be of one model (same
/// fingerprint and geometry); weights must be finite, non-negative and not all zero. The token
/// count is the weighted sum when every input has one.
pub fn merge(inputs: &[MergeInput]) -> Result<Merged, ProfileError> {
    let Some(first) = inputs.first() else {
        return Err(merge_err(Path::new("(none)"), "no profiles to merge"));
    };
    same_model(
        "merge",
        inputs.iter().map(|i| (i.path.as_path(), &i.profile)),
    )?;
    for i in inputs {
        if !i.weight.is_finite() || i.weight < 0.0 {
            return Err(merge_err(
                &i.path,
                format!("weight {} is not a finite non-negative number", i.weight),
            ));
        }
    }
    if inputs.iter().all(|i| i.weight == 0.0) {
        return Err(merge_err(
            &first.path,
            "every weight is 0: nothing to merge",
        ));
    }
    let (n_layer, n_expert) = (first.profile.n_layer(), first.profile.n_expert());
    let mut sums = vec![0u128; n_layer * n_expert];
    for i in inputs {
        for l in 0..n_layer {
            for (e, &c) in i.profile.counts.layer(l).iter().enumerate() {
                let s = &mut sums[l * n_expert + e];
                *s = s.saturating_add(weighted(c, i.weight));
            }
        }
    }
    // Halve everything together until the total fits (ratios kept).
    let mut halvings = 0u32;
    let total_after = |h: u32| sums.iter().fold(0u128, |t, &c| t.saturating_add(c >> h));
    while total_after(halvings) > u128::from(MAX_TOTAL) {
        halvings += 1;
    }
    let mut counts = Counts::zero(n_layer, n_expert);
    for l in 0..n_layer {
        for e in 0..n_expert {
            // ≤ MAX_TOTAL < 2^64 after the halvings.
            counts.set(l, e, (sums[l * n_expert + e] >> halvings) as u64);
        }
    }
    let tokens = inputs
        .iter()
        .map(|i| i.profile.tokens.map(|t| weighted(t, i.weight)))
        .try_fold(0u128, |acc, t| t.map(|t| acc.saturating_add(t)))
        .map(|t| u64::try_from(t >> halvings).unwrap_or(u64::MAX));
    let mut profile = Profile::new(
        counts,
        first.profile.n_expert_used,
        first.profile.fingerprint.clone(),
    );
    profile.tokens = tokens;
    profile.updated = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs());
    Ok(Merged { profile, halvings })
}

/// How two profiles' routing differs in one layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerDiff {
    pub layer: usize,
    /// Experts in both hot sets, out of the hot set's size.
    pub overlap: usize,
    /// Fraction of A's uses that A's own hot set covers.
    pub a_on_a: f64,
    /// Fraction of A's uses that B's hot set covers.
    pub b_on_a: f64,
    pub b_on_b: f64,
    pub a_on_b: f64,
}

/// How two profiles' routing differs: per layer and over the whole model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diff {
    pub a: String,
    pub b: String,
    pub a_tokens: Option<u64>,
    pub b_tokens: Option<u64>,
    /// Size of the hot set per layer (the experts a pinned cache of that many slots would hold).
    pub slots: usize,
    pub layers: Vec<LayerDiff>,
    /// Mean overlap over the layers, as a fraction of `slots`.
    pub overlap: f64,
    /// Whole-model hit ratios (every layer's uses together).
    pub a_on_a: f64,
    pub b_on_a: f64,
    pub b_on_b: f64,
    pub a_on_b: f64,
}

/// The `n` experts with the most uses in `layer` (ties by lower id).
fn hot_set(c: &Counts, layer: usize, n: usize) -> Vec<u16> {
    let mut r = c.ranked(layer);
    r.truncate(n);
    r
}

/// Uses of `layer` in `c` that the experts `set` cover, and all uses of the layer (128 bits:
/// a profile may hold up to 2^63 in all).
fn covered(c: &Counts, layer: usize, set: &[u16]) -> (u128, u128) {
    let row = c.layer(layer);
    let hit = set.iter().map(|&e| u128::from(row[usize::from(e)])).sum();
    let all = row.iter().map(|&x| u128::from(x)).sum();
    (hit, all)
}

fn ratio(hit: u128, all: u128) -> f64 {
    if all == 0 {
        0.0
    } else {
        hit as f64 / all as f64
    }
}

/// Compares profile `a` with `b`: the hot set of each layer (its `slots` most used experts), how
/// many experts the two hot sets share, and the hit ratio each hot set gets on each profile's
/// counts. Both must be of one model (same fingerprint and geometry).
pub fn diff(
    (a_path, a): (&Path, &Profile),
    (b_path, b): (&Path, &Profile),
    slots: Option<usize>,
) -> Result<Diff, ProfileError> {
    same_model("diff", [(a_path, a), (b_path, b)])?;
    let slots = slots
        .unwrap_or(2 * a.n_expert_used as usize)
        .clamp(1, a.n_expert());
    let mut layers = Vec::with_capacity(a.n_layer());
    let mut tot = [(0u128, 0u128); 4];
    for l in 0..a.n_layer() {
        let (ha, hb) = (hot_set(&a.counts, l, slots), hot_set(&b.counts, l, slots));
        let overlap = ha.iter().filter(|e| hb.contains(e)).count();
        let parts = [
            covered(&a.counts, l, &ha),
            covered(&a.counts, l, &hb),
            covered(&b.counts, l, &hb),
            covered(&b.counts, l, &ha),
        ];
        for (t, p) in tot.iter_mut().zip(parts) {
            t.0 += p.0;
            t.1 += p.1;
        }
        let [aa, ba, bb, ab] = parts.map(|(h, a)| ratio(h, a));
        layers.push(LayerDiff {
            layer: l,
            overlap,
            a_on_a: aa,
            b_on_a: ba,
            b_on_b: bb,
            a_on_b: ab,
        });
    }
    let overlap =
        layers.iter().map(|l| l.overlap as f64).sum::<f64>() / (layers.len().max(1) * slots) as f64;
    let [aa, ba, bb, ab] = tot.map(|(h, a)| ratio(h, a));
    Ok(Diff {
        a: a_path.display().to_string(),
        b: b_path.display().to_string(),
        a_tokens: a.tokens,
        b_tokens: b.tokens,
        slots,
        layers,
        overlap,
        a_on_a: aa,
        b_on_a: ba,
        b_on_b: bb,
        a_on_b: ab,
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

impl Diff {
    /// The table `spark profile diff` prints.
    pub fn render(&self) -> String {
        let tok = |t: Option<u64>| t.map_or("unknown".into(), |t| t.to_string());
        let mut out = String::new();
        let _ = writeln!(out, "A  {} ({} tokens)", self.a, tok(self.a_tokens));
        let _ = writeln!(out, "B  {} ({} tokens)", self.b, tok(self.b_tokens));
        let _ = writeln!(
            out,
            "hot set: the {} most used experts of each layer; hit ratio: the share of a profile's uses that a hot set covers",
            self.slots
        );
        let _ = writeln!(
            out,
            "layer  overlap   on A: A's set  B's set   on B: B's set  A's set"
        );
        for l in &self.layers {
            let _ = writeln!(
                out,
                "{:>5}  {:>3}/{:<3}  {:>14}  {:>7}  {:>14}  {:>7}",
                l.layer,
                l.overlap,
                self.slots,
                pct(l.a_on_a),
                pct(l.b_on_a),
                pct(l.b_on_b),
                pct(l.a_on_b)
            );
        }
        let _ = writeln!(
            out,
            "  all  {:>7}  {:>14}  {:>7}  {:>14}  {:>7}",
            pct(self.overlap),
            pct(self.a_on_a),
            pct(self.b_on_a),
            pct(self.b_on_b),
            pct(self.a_on_b)
        );
        let _ = writeln!(
            out,
            "B's hot set on A's traffic: {} points below A's own; A's on B's: {} points below B's own",
            format_args!("{:.1}", 100.0 * (self.a_on_a - self.b_on_a)),
            format_args!("{:.1}", 100.0 * (self.b_on_b - self.a_on_b))
        );
        out
    }
}

/// `spark profile merge`.
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// Profiles of one model (`<model>.gguf.spark.csv` from each machine)
    #[arg(required = true, num_args = 1..)]
    pub profiles: Vec<PathBuf>,
    /// The merged profile (written atomically; may be one of the inputs)
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Weight of each input, in order, one per profile (default: 1 each): counts are added
    /// times their weight
    #[arg(long = "weight", value_name = "W")]
    pub weights: Vec<f64>,
}

/// `spark profile diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// Profile A
    pub a: PathBuf,
    /// Profile B (of the same model)
    pub b: PathBuf,
    /// Hot-set size per layer: the experts a pinned cache of that many slots would hold
    /// (default: 2 × experts per token, as serve's shadow cache)
    #[arg(long)]
    pub slots: Option<usize>,
    /// Print JSON instead of the table
    #[arg(long)]
    pub json: bool,
}

/// Runs `spark profile merge`, printing what was merged.
pub fn run_merge(a: &MergeArgs) -> Result<(), ProfileError> {
    if !a.weights.is_empty() && a.weights.len() != a.profiles.len() {
        return Err(merge_err(
            &a.out,
            format!(
                "{} --weight values for {} profiles: give one per profile, in order, or none",
                a.weights.len(),
                a.profiles.len()
            ),
        ));
    }
    let inputs = a
        .profiles
        .iter()
        .enumerate()
        .map(|(i, path)| {
            Ok(MergeInput {
                path: path.clone(),
                profile: Profile::read(path)?,
                weight: a.weights.get(i).copied().unwrap_or(1.0),
            })
        })
        .collect::<Result<Vec<_>, ProfileError>>()?;
    let merged = merge(&inputs)?;
    merged.profile.write(&a.out)?;
    let tok = |t: Option<u64>| t.map_or("unknown".into(), |t| t.to_string());
    for i in &inputs {
        println!(
            "  {}  weight {}  {} tokens  {} uses",
            i.path.display(),
            i.weight,
            tok(i.profile.tokens),
            i.profile.counts.total()
        );
    }
    println!(
        "merged {} profiles of model {} into {}: {} tokens, {} uses{}",
        inputs.len(),
        merged.profile.fingerprint.as_deref().unwrap_or_default(),
        a.out.display(),
        tok(merged.profile.tokens),
        merged.profile.counts.total(),
        if merged.halvings > 0 {
            format!(
                " (the sums passed 2^63 and were halved {} times, ratios kept)",
                merged.halvings
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Runs `spark profile diff`, printing the table or JSON.
pub fn run_diff(a: &DiffArgs) -> Result<(), ProfileError> {
    let pa = Profile::read(&a.a)?;
    let pb = Profile::read(&a.b)?;
    let d = diff((&a.a, &pa), (&a.b, &pb), a.slots)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&d).expect("a diff serialises")
        );
    } else {
        print!("{}", d.render());
    }
    Ok(())
}

/// The `spark profile` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ProfileCommand {
    /// Show a profile's geometry, freshness lines and per-layer skew
    Show(ProfileShowArgs),
    /// Add several machines' profiles of one model into one (same fingerprint required)
    Merge(MergeArgs),
    /// How far two profiles' routing differs: hot-set overlap and cross hit ratios per layer
    Diff(DiffArgs),
}

#[derive(Debug, clap::Args)]
pub struct ProfileShowArgs {
    /// The profile (`<model>.gguf.spark.csv`)
    pub profile: PathBuf,
    /// Also draw the per-(layer, expert) hotness as an SVG heatmap
    #[arg(long, value_name = "OUT.svg")]
    pub heatmap: Option<PathBuf>,
}

/// Runs one `spark profile` subcommand, printing to stdout.
pub fn run(cmd: ProfileCommand) -> Result<(), crate::profile::ProfileError> {
    match cmd {
        ProfileCommand::Merge(a) => run_merge(&a)?,
        ProfileCommand::Diff(a) => run_diff(&a)?,
        ProfileCommand::Show(a) => {
            let p = crate::profile::Profile::read(&a.profile)?;
            print!("{}", p.summary(&a.profile));
            if let Some(out) = a.heatmap {
                let svg = crate::svg::heatmap(
                    &format!("expert hotness: {}", a.profile.display()),
                    &p.counts,
                );
                crate::atomic_file::write_atomic_with(
                    &out,
                    svg.as_bytes(),
                    crate::atomic_file::Mode::Public,
                )
                .map_err(|source| crate::profile::ProfileError::Write {
                    path: out.clone(),
                    source,
                })?;
                println!("wrote {}", out.display());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(rows: &[&[u64]], k: u32, fp: Option<&str>, tokens: Option<u64>) -> Profile {
        let mut c = Counts::zero(rows.len(), rows[0].len());
        for (l, r) in rows.iter().enumerate() {
            for (e, &v) in r.iter().enumerate() {
                c.set(l, e, v);
            }
        }
        let mut p = Profile::new(c, k, fp.map(str::to_string));
        p.tokens = tokens;
        p
    }

    fn input(name: &str, p: Profile, weight: f64) -> MergeInput {
        MergeInput {
            path: PathBuf::from(name),
            profile: p,
            weight,
        }
    }

    #[test]
    fn counts_and_tokens_add_and_weights_scale() {
        let a = profile(&[&[5, 0, 3, 1], &[0, 7, 2, 2]], 2, Some("fp"), Some(10));
        let b = profile(&[&[1, 1, 1, 1], &[4, 0, 0, 0]], 2, Some("fp"), Some(4));
        let m = merge(&[input("a", a.clone(), 1.0), input("b", b.clone(), 1.0)]).unwrap();
        assert_eq!(m.halvings, 0);
        assert_eq!(m.profile.counts.layer(0), &[6, 1, 4, 2]);
        assert_eq!(m.profile.counts.layer(1), &[4, 7, 2, 2]);
        assert_eq!(m.profile.tokens, Some(14));
        assert_eq!(m.profile.fingerprint.as_deref(), Some("fp"));
        let m = merge(&[input("a", a.clone(), 0.5), input("b", b, 2.0)]).unwrap();
        assert_eq!(m.profile.counts.layer(0), &[5, 2, 4, 3]); // 2.5→3 (round half away), 0+2, 1.5+2→4, 0.5+2→3
        assert_eq!(m.profile.tokens, Some(13));
        // One input with weight 1 is itself.
        let m = merge(&[input("a", a.clone(), 1.0)]).unwrap();
        assert_eq!(m.profile.counts, a.counts);
    }

    #[test]
    fn sums_past_the_limit_are_halved_together_instead_of_overflowing() {
        let big = MAX_TOTAL / 2;
        let a = profile(&[&[big, big / 2]], 1, Some("fp"), Some(u64::MAX));
        let m = merge(&[
            input("a", a.clone(), 1.0),
            input("b", a.clone(), 1.0),
            input("c", a, 3.0),
        ])
        .unwrap();
        assert!(m.halvings > 0);
        let row = m.profile.counts.layer(0);
        assert!(row[0] as u128 + row[1] as u128 <= MAX_TOTAL as u128);
        assert_eq!(row[0], 2 * row[1], "ratios kept: {row:?}");
        // The written file reads back (the reader's own limit holds).
        let text = m.profile.render();
        Profile::parse(&text, Path::new("m.csv")).unwrap();
    }

    #[test]
    fn another_model_or_no_fingerprint_is_refused_naming_the_file() {
        let a = profile(&[&[1, 2]], 1, Some("gguf-1-aaaa"), None);
        let b = profile(&[&[1, 2]], 1, Some("gguf-1-bbbb"), None);
        let e = merge(&[input("a.csv", a.clone(), 1.0), input("b.csv", b, 1.0)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b.csv") && e.contains("gguf-1-bbbb") && e.contains("gguf-1-aaaa"),
            "{e}"
        );
        let luce = profile(&[&[1, 2]], 1, None, None);
        let e = merge(&[input("a.csv", a.clone(), 1.0), input("luce.csv", luce, 1.0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("luce.csv") && e.contains("fingerprint"), "{e}");
        let wide = profile(&[&[1, 2, 3]], 1, Some("gguf-1-aaaa"), None);
        let e = merge(&[input("a.csv", a.clone(), 1.0), input("w.csv", wide, 1.0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("w.csv") && e.contains("geometry"), "{e}");
        for w in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(merge(&[input("a.csv", a.clone(), w)]).is_err(), "{w}");
        }
        assert!(merge(&[input("a.csv", a.clone(), 0.0)]).is_err());
        let e = diff(
            (Path::new("a.csv"), &a),
            (
                Path::new("c.csv"),
                &profile(&[&[1, 2]], 1, Some("gguf-1-cccc"), None),
            ),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.csv") && e.contains("one model"), "{e}");
    }

    #[test]
    fn diff_measures_overlap_and_cross_hit_ratios() {
        // Layer 0: A's hot pair {0,1}, B's {2,3}: no overlap. Layer 1: both {0,1}.
        let a = profile(&[&[6, 2, 1, 1], &[5, 3, 1, 1]], 1, Some("fp"), Some(10));
        let b = profile(&[&[1, 1, 4, 4], &[4, 4, 1, 1]], 1, Some("fp"), Some(10));
        let d = diff((Path::new("a"), &a), (Path::new("b"), &b), Some(2)).unwrap();
        assert_eq!(d.slots, 2);
        assert_eq!((d.layers[0].overlap, d.layers[1].overlap), (0, 2));
        assert!((d.layers[0].a_on_a - 0.8).abs() < 1e-9);
        assert!((d.layers[0].b_on_a - 0.2).abs() < 1e-9);
        assert!((d.layers[0].b_on_b - 0.8).abs() < 1e-9);
        assert!((d.layers[0].a_on_b - 0.2).abs() < 1e-9);
        assert!((d.layers[1].a_on_b - 0.8).abs() < 1e-9);
        assert!((d.overlap - 0.5).abs() < 1e-9);
        // Whole model: A's set on B covers 2 + 8 of 20 uses.
        assert!((d.a_on_b - 0.5).abs() < 1e-9);
        // A profile against itself: full overlap, equal ratios.
        let s = diff((Path::new("a"), &a), (Path::new("a"), &a), None).unwrap();
        assert_eq!(s.overlap, 1.0);
        assert_eq!(s.a_on_a, s.b_on_a);
        let text = d.render();
        assert!(text.contains("    0    0/2"), "{text}");
    }
}
