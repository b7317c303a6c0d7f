//! Decode attention over a paged KV pool: each sequence's one new query
//! (every head) against the keys and values of the positions it attends,
//! read where they lie in the pool (a slot per position), with no copy of
//! the cache and no repeated key/value heads (GQA: the query heads of a
//! key/value head read it once). Scores and softmax in f32, as libtorch's
//! CPU flash attention computes them (its exp, its sums, the output times
//! the sum's reciprocal); in bf16 the softmax numerators are rounded to bf16
//! before they weight the values, and the output at the end, as there.

use crate::avx512::{Kernel, exp_sum};
use crate::blocks::{Plain, dots};
use crate::linear::{Shape, ShapeError, supported};
use crate::parallel::{Parallel, for_each_unit};

/// One layer of the pool: keys and values `[slots, kv_heads, head_dim]`.
#[derive(Clone, Copy)]
pub struct KvLayer<'a, E> {
    pub keys: &'a [E],
    pub values: &'a [E],
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The positions each sequence attends: sequence `s` reads the slots
/// `slots[offsets[s]..offsets[s + 1]]`, oldest first; and, where given,
/// each query head's sink (gpt-oss): one more position with that logit
/// and no value, which takes its share of the softmax.
#[derive(Clone, Copy)]
pub struct Attended<'a> {
    pub slots: &'a [u32],
    pub offsets: &'a [usize],
    pub sinks: Option<&'a [f32]>,
}

/// `out[s][h] = softmax(q[s][h] · Kᵀ / √head_dim) · V` over the keys `K`
/// and values `V` of sequence `s`'s attended slots, for every query head
/// `h` (of `heads`; heads `g·heads/kv_heads..` read key/value head `g`).
/// `q` and `out` are `[sequences, heads, head_dim]`.
pub fn decode_attention<K: Kernel>(
    team: &dyn Parallel,
    q: &[K::Elem],
    heads: usize,
    kv: KvLayer<'_, K::Elem>,
    attended: Attended<'_>,
    out: &mut [K::Elem],
) -> Result<(), ShapeError> {
    let KvLayer {
        keys,
        values,
        kv_heads,
        head_dim,
    } = kv;
    let sequences = attended.offsets.len().saturating_sub(1);
    let shape = Shape {
        rows: sequences,
        inner: head_dim,
        outputs: heads,
    };
    let length = |what, len, needed| {
        (len != needed).then_some(ShapeError::Length {
            what,
            len,
            needed,
            shape,
        })
    };
    let row = kv_heads * head_dim;
    let slots = keys.len() / row.max(1);
    let fits = [
        length("q", q.len(), sequences * heads * head_dim),
        length("the output", out.len(), q.len()),
        length("the values", values.len(), keys.len()),
        length("the keys", keys.len(), slots * row),
        length(
            "the heads",
            heads,
            heads.div_ceil(kv_heads.max(1)) * kv_heads,
        ),
        length(
            "the offsets",
            attended.offsets.last().copied().unwrap_or(0),
            attended.slots.len(),
        ),
        attended
            .sinks
            .and_then(|sinks| length("the sinks", sinks.len(), heads)),
    ];
    if let Some(error) = fits.into_iter().flatten().next() {
        return Err(error);
    }
    if kv_heads == 0 || head_dim == 0 || attended.offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(ShapeError::Length {
            what: "the offsets",
            len: attended.offsets.len(),
            needed: sequences + 1,
            shape,
        });
    }
    if let Some(&slot) = attended.slots.iter().find(|&&slot| slot as usize >= slots) {
        return Err(ShapeError::Slot { slot, slots });
    }
    if !supported(K::ELEMENT) {
        return Err(ShapeError::Unsupported(K::ELEMENT));
    }
    let groups = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let out = crate::blocks::Output(out.as_mut_ptr());
    let out = &out;
    for_each_unit(team, sequences * kv_heads, &|unit| {
        let (sequence, kv_head) = (unit / kv_heads, unit % kv_heads);
        let slots = &attended.slots[attended.offsets[sequence]..attended.offsets[sequence + 1]];
        let first_head = sequence * heads + kv_head * groups;
        let q = &q[first_head * head_dim..][..groups * head_dim];
        let key = |i: usize| {
            keys.as_ptr()
                .wrapping_add(slots[i] as usize * row + kv_head * head_dim)
        };
        let value = |i: usize| {
            values
                .as_ptr()
                .wrapping_add(slots[i] as usize * row + kv_head * head_dim)
        };
        let n = slots.len();
        // scores[g][i]: query head g against position i.
        let mut scores = vec![0.0f32; groups * n];
        let mut i = 0;
        while i + 4 <= n {
            let w = [key(i), key(i + 1), key(i + 2), key(i + 3)];
            let ahead = w.map(|_| key((i + 4).min(n - 1)));
            let each = |g: usize, dots: [f32; 4]| {
                for (offset, dot) in dots.into_iter().enumerate() {
                    scores[g * n + i + offset] = dot * scale;
                }
            };
            // SAFETY: supported; q holds `groups` rows of head_dim, each key
            // head_dim elements at a checked slot.
            unsafe { dots::<K, Plain, 4, 4>(q, groups, (head_dim, head_dim), w, ahead, each) };
            i += 4;
        }
        for i in i..n {
            let each = |g: usize, [dot]: [f32; 1]| scores[g * n + i] = dot * scale;
            // SAFETY: as above, for the one key left.
            unsafe {
                dots::<K, Plain, 1, 4>(q, groups, (head_dim, head_dim), [key(i)], [key(i)], each)
            };
        }
        // Softmax numerators, rounded as the element type, and their sums.
        let mut sums = vec![0.0f32; groups];
        for (g, sum) in sums.iter_mut().enumerate() {
            let row = &mut scores[g * n..(g + 1) * n];
            let sink = attended.sinks.map(|sinks| sinks[kv_head * groups + g]);
            let max = row
                .iter()
                .copied()
                .fold(sink.unwrap_or(f32::NEG_INFINITY), f32::max);
            // SAFETY: supported (AVX-512F).
            *sum = unsafe { exp_sum(row, max) } + sink.map_or(0.0, |sink| (sink - max).exp());
            for weight in row.iter_mut() {
                *weight = K::to_f32(K::from_f32(*weight));
            }
        }
        let mut acc = vec![0.0f32; groups * head_dim];
        let rows: Vec<_> = (0..n).map(value).collect();
        // SAFETY: supported; acc holds `groups` rows of head_dim, scores `n`
        // weights per row, and each value row head_dim elements.
        unsafe { K::add_weighted(&mut acc, &scores, &rows, head_dim) };
        for (g, sum) in sums.iter().enumerate() {
            for d in 0..head_dim {
                let value = if n == 0 || *sum == 0.0 {
                    0.0
                } else {
                    acc[g * head_dim + d] / sum
                };
                // SAFETY: this unit's own heads of its own sequence, in bounds.
                unsafe { out.write((first_head + g) * head_dim + d, K::from_f32(value)) };
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Decode attention against a plain f64 softmax over the same slots.

    use proptest::prelude::*;

    use super::*;
    use crate::Element;
    use crate::avx512::{Bf16, F32, bf16_from_f32, f32_from_bf16};
    use crate::parallel::{Scoped, Serial};

    /// Per sequence and head: the f64 attention output and, per element,
    /// the largest value magnitude it averages (which bounds its rounding).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        (heads, kv_heads, head_dim): (usize, usize, usize),
        attended: Attended<'_>,
    ) -> Vec<(f64, f64)> {
        let sink = |h: usize| attended.sinks.map(|sinks| f64::from(sinks[h]));
        let sequences = attended.offsets.len() - 1;
        let groups = heads / kv_heads;
        let mut out = Vec::new();
        for s in 0..sequences {
            let slots = &attended.slots[attended.offsets[s]..attended.offsets[s + 1]];
            for h in 0..heads {
                let kvh = h / groups;
                let q = &q[(s * heads + h) * head_dim..][..head_dim];
                let at = |slot: u32| (slot as usize * kv_heads + kvh) * head_dim;
                let scores: Vec<f64> = slots
                    .iter()
                    .map(|&slot| {
                        let k = &keys[at(slot)..][..head_dim];
                        let dot: f64 = q
                            .iter()
                            .zip(k)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum();
                        dot / (head_dim as f64).sqrt()
                    })
                    .collect();
                let max = scores
                    .iter()
                    .copied()
                    .fold(sink(h).unwrap_or(f64::NEG_INFINITY), f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 =
                    weights.iter().sum::<f64>() + sink(h).map_or(0.0, |sink| (sink - max).exp());
                for d in 0..head_dim {
                    let (mut value, mut size) = (0.0, 0.0f64);
                    for (&slot, w) in slots.iter().zip(&weights) {
                        let v = f64::from(values[at(slot) + d]);
                        value += w / sum * v;
                        size = size.max(v.abs());
                    }
                    out.push((value, size));
                }
            }
        }
        out
    }

    type Case = (usize, usize, usize, Vec<usize>, u64, usize);

    fn case() -> impl Strategy<Value = Case> {
        // kv heads, groups, head_dim, positions per sequence, seed, threads
        (
            1usize..4,
            prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
            1usize..80,
            proptest::collection::vec(1usize..40, 1..5),
            any::<u64>(),
            1usize..4,
        )
    }

    proptest! {
        #[test]
        fn matches_softmax_attention((kv_heads, groups, head_dim, lens, seed, threads) in case()) {
            if !supported(Element::Bf16) {
                return Ok(()); // no AVX-512 here: nothing runs these kernels
            }
            let heads = kv_heads * groups;
            let slots_total = 64;
            let mut state = seed | 1;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2001) as f32 / 1000.0 - 1.0
            };
            let row = kv_heads * head_dim;
            let keys: Vec<f32> = (0..slots_total * row).map(|_| 2.0 * next()).collect();
            let values: Vec<f32> = (0..slots_total * row).map(|_| next()).collect();
            let q: Vec<f32> = (0..lens.len() * heads * head_dim).map(|_| 2.0 * next()).collect();
            // Each sequence's slots: scattered over the pool, repeats allowed.
            let slots: Vec<u32> = lens.iter().flat_map(|&n| (0..n).map(move |i| ((i * 37 + n * 11) % slots_total) as u32)).collect::<Vec<_>>();
            let offsets: Vec<usize> = std::iter::once(0).chain(lens.iter().scan(0, |at, n| { *at += n; Some(*at) })).collect();
            // Every other case with sinks, some above the scores, some below.
            let sinks: Vec<f32> = (0..heads).map(|_| 4.0 * next()).collect();
            let sinks = (seed % 2 == 0).then_some(sinks.as_slice());
            let attended = Attended { slots: &slots, offsets: &offsets, sinks };
            let dims = (heads, kv_heads, head_dim);
            let team = Scoped(threads);

            let expected = reference(&q, &keys, &values, dims, attended);
            let mut out = vec![f32::NAN; q.len()];
            let kv = KvLayer { keys: &keys, values: &values, kv_heads, head_dim };
            decode_attention::<F32>(&team, &q, heads, kv, attended, &mut out).unwrap();
            for (i, (&ours, &(want, size))) in out.iter().zip(&expected).enumerate() {
                prop_assert!((f64::from(ours) - want).abs() <= 1e-5 * size + 1e-6, "f32 {i}: {ours} vs {want}");
            }

            let bf16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|&v| bf16_from_f32(v)).collect() };
            let exact = |v: &[u16]| -> Vec<f32> { v.iter().map(|&b| f32_from_bf16(b)).collect() };
            let (qb, kb, vb) = (bf16(&q), bf16(&keys), bf16(&values));
            let expected = reference(&exact(&qb), &exact(&kb), &exact(&vb), dims, attended);
            let mut out = vec![0u16; q.len()];
            let kv = KvLayer { keys: &kb, values: &vb, kv_heads, head_dim };
            decode_attention::<Bf16>(&team, &qb, heads, kv, attended, &mut out).unwrap();
            // The numerators and the output each rounded to bf16 (2⁻⁸).
            for (i, (&ours, &(want, size))) in exact(&out).iter().zip(&expected).enumerate() {
                prop_assert!((f64::from(ours) - want).abs() <= 3.0 / 256.0 * size + 1e-6, "bf16 {i}: {ours} vs {want}");
            }
        }
    }

    #[test]
    fn bad_slots_and_lengths_are_refused() {
        let (keys, values) = (vec![0.0f32; 4 * 2 * 8], vec![0.0f32; 4 * 2 * 8]);
        let kv = KvLayer {
            keys: &keys,
            values: &values,
            kv_heads: 2,
            head_dim: 8,
        };
        let q = vec![0.0f32; 4 * 8];
        let mut out = vec![0.0f32; 4 * 8];
        let attended = Attended {
            sinks: None,
            slots: &[0, 4],
            offsets: &[0, 2],
        };
        let err = decode_attention::<F32>(&Serial, &q, 4, kv, attended, &mut out).unwrap_err();
        assert_eq!(err, ShapeError::Slot { slot: 4, slots: 4 });
        let attended = Attended {
            sinks: None,
            slots: &[0, 1],
            offsets: &[0, 3],
        };
        let err = decode_attention::<F32>(&Serial, &q, 4, kv, attended, &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                ShapeError::Length {
                    what: "the offsets",
                    ..
                }
            ),
            "{err}"
        );
        let attended = Attended {
            sinks: None,
            slots: &[0, 1],
            offsets: &[0, 2],
        };
        let err =
            decode_attention::<F32>(&Serial, &q, 3, kv, attended, &mut out[..24]).unwrap_err();
        assert!(matches!(err, ShapeError::Length { .. }), "{err}");
    }
}
