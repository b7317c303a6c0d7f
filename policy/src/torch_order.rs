//! PyTorch's CPU orderings that decide EPLB's ties: the order `torch.sum`
//! adds a row in, and the (unstable) order `torch.sort(descending=True)`
//! leaves equal values in. [`crate::eplb`] uses them so its placements equal
//! those of DeepSeek's `eplb.py`.

/// `torch.sum(-1)` of a contiguous `f32` row on CPU (`cascade_sum` in
/// aten/src/ATen/native/cpu/SumKernel.cpp, 8-lane vectors, which the sum kernel
/// uses even on AVX-512 machines): rows shorter than 8 go through the scalar
/// `row_sum`; longer ones sum 8-lane vectors, then add the scalar tail and then
/// the lanes in order. The order matters once sums round, e.g. `[1, 1, 1, 1, 2^24]`.
pub(crate) fn torch_sum(row: &[f32]) -> f32 {
    const LANES: usize = 8;
    if row.len() < LANES {
        return row_sum::<1>(row)[0];
    }
    let vectors = row.len() / LANES * LANES;
    let lanes = row_sum::<LANES>(&row[..vectors]);
    let mut total = 0.0f32;
    for &x in &row[vectors..] {
        total += x;
    }
    for lane in lanes {
        total += lane;
    }
    total
}

/// aten's `row_sum` over `row` read as items of `L` lanes: four interleaved
/// accumulators (`multi_row_sum`, itself a four-level cascade), the leftover
/// items added to the first, then the four folded left to right.
fn row_sum<const L: usize>(row: &[f32]) -> [f32; L] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let item = |i: usize| &row[i * L..(i + 1) * L];
    let add = |acc: &mut [f32; L], x: &[f32]| {
        for (a, &x) in acc.iter_mut().zip(x) {
            *a += x;
        }
    };
    let items = row.len() / L;
    let rows = items / ILP;

    // multi_row_sum over `rows` rows of ILP items.
    let level_power = (ceil_log2(rows) / LEVELS).max(4);
    let level_step = 1 << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; L]; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= rows {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, item(i * ILP + k));
            }
            i += 1;
        }
        for level in 1..LEVELS {
            let lower = std::mem::replace(&mut acc[level - 1], [[0.0; L]; ILP]);
            for (a, x) in acc[level].iter_mut().zip(&lower) {
                add(a, x);
            }
            if i & (level_mask << (level * level_power)) != 0 {
                break;
            }
        }
    }
    for i in i..rows {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, item(i * ILP + k));
        }
    }
    let [mut partial, upper @ ..] = acc;
    for level in upper {
        for (a, x) in partial.iter_mut().zip(&level) {
            add(a, x);
        }
    }

    let [mut total, rest @ ..] = partial;
    for i in rows * ILP..items {
        add(&mut total, item(i));
    }
    for x in rest {
        add(&mut total, &x);
    }
    total
}

/// c10's `CeilLog2`: 1 for x <= 2.
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (x - 1).ilog2() as usize + 1
    }
}

type Keyed = (f32, usize);

/// Sorts before: torch's `KeyValueCompDesc` (no NaN here).
fn before(a: &Keyed, b: &Keyed) -> bool {
    a.0 > b.0
}

/// `values.sort(descending=True).indices` as torch computes it on CPU:
/// libstdc++'s `std::sort` (introsort: median-of-three quicksort down to runs
/// of 16, heapsort past a depth of 2 log2 n, then insertion sort) on
/// (value, index) pairs compared by value. It is not stable, so equal values
/// come out in the order it happens to leave them; a stable sort gives other
/// placements whenever loads tie, which replicas of one expert always do.
pub(crate) fn argsort_descending(values: &[f32]) -> Vec<usize> {
    let mut items: Vec<Keyed> = values.iter().copied().zip(0..).collect();
    let n = items.len();
    if n > 1 {
        introsort_loop(&mut items, 0, n, 2 * n.ilog2() as usize);
        final_insertion_sort(&mut items);
    }
    items.into_iter().map(|(_, i)| i).collect()
}

const INSERTION_THRESHOLD: usize = 16;

fn introsort_loop(s: &mut [Keyed], first: usize, mut last: usize, mut depth: usize) {
    while last - first > INSERTION_THRESHOLD {
        if depth == 0 {
            heap_sort(&mut s[first..last]);
            return;
        }
        depth -= 1;
        let mid = first + (last - first) / 2;
        move_median_to_first(s, first, first + 1, mid, last - 1);
        let cut = unguarded_partition(s, first + 1, last, first);
        introsort_loop(s, cut, last, depth);
        last = cut;
    }
}

fn move_median_to_first(s: &mut [Keyed], result: usize, a: usize, b: usize, c: usize) {
    let median = if before(&s[a], &s[b]) {
        if before(&s[b], &s[c]) {
            b
        } else if before(&s[a], &s[c]) {
            c
        } else {
            a
        }
    } else if before(&s[a], &s[c]) {
        a
    } else if before(&s[b], &s[c]) {
        c
    } else {
        b
    };
    s.swap(result, median);
}

fn unguarded_partition(s: &mut [Keyed], mut first: usize, mut last: usize, pivot: usize) -> usize {
    loop {
        while before(&s[first], &s[pivot]) {
            first += 1;
        }
        last -= 1;
        while before(&s[pivot], &s[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        s.swap(first, last);
        first += 1;
    }
}

/// `std::__partial_sort(first, last, last)`: make_heap, then sort_heap.
fn heap_sort(h: &mut [Keyed]) {
    let len = h.len();
    if len >= 2 {
        let mut parent = (len - 2) / 2;
        loop {
            adjust_heap(h, parent, len, h[parent]);
            if parent == 0 {
                break;
            }
            parent -= 1;
        }
    }
    for last in (1..len).rev() {
        let value = h[last];
        h[last] = h[0];
        adjust_heap(h, 0, last, value);
    }
}

/// `std::__adjust_heap` followed by its `std::__push_heap`.
fn adjust_heap(h: &mut [Keyed], mut hole: usize, len: usize, value: Keyed) {
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if before(&h[child], &h[child - 1]) {
            child -= 1;
        }
        h[hole] = h[child];
        hole = child;
    }
    if len.is_multiple_of(2) && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        h[hole] = h[child - 1];
        hole = child - 1;
    }
    while hole > top && before(&h[(hole - 1) / 2], &value) {
        let parent = (hole - 1) / 2;
        h[hole] = h[parent];
        hole = parent;
    }
    h[hole] = value;
}

fn final_insertion_sort(s: &mut [Keyed]) {
    if s.len() > INSERTION_THRESHOLD {
        insertion_sort(&mut s[..INSERTION_THRESHOLD]);
        for i in INSERTION_THRESHOLD..s.len() {
            unguarded_linear_insert(s, i);
        }
    } else {
        insertion_sort(s);
    }
}

fn insertion_sort(s: &mut [Keyed]) {
    for i in 1..s.len() {
        if before(&s[i], &s[0]) {
            let value = s[i];
            s.copy_within(0..i, 1);
            s[0] = value;
        } else {
            unguarded_linear_insert(s, i);
        }
    }
}

/// Moves `s[last]` down past the items it sorts before; something earlier
/// stops it (that is what "unguarded" relies on).
fn unguarded_linear_insert(s: &mut [Keyed], mut last: usize) {
    let value = s[last];
    while before(&value, &s[last - 1]) {
        s[last] = s[last - 1];
        last -= 1;
    }
    s[last] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argsort_matches_torch_including_its_heapsort_fallback() {
        assert_eq!(
            argsort_descending(&[1., 3., 2., 3., 3., 0., 1., 2., 3.]),
            vec![1, 3, 4, 8, 2, 7, 0, 6, 5]
        );
        // A McIlroy "antiqsort" input (halved, so that it ties) deep enough for
        // introsort to switch to heapsort; the order is torch 2.11's.
        let values = [
            1., 0., 16., 15., 14., 15., 13., 14., 13., 12., 16., 18., 12., 17., 11., 20., 11., 17.,
            10., 18., 10., 19., 9., 9., 8., 8., 7., 7., 6., 6., 5., 5., 4., 4., 3., 3., 2., 2., 1.,
            0.,
        ];
        assert_eq!(
            argsort_descending(&values),
            vec![
                15, 21, 11, 19, 17, 13, 10, 2, 3, 5, 7, 4, 8, 6, 9, 12, 16, 14, 18, 20, 22, 23, 24,
                25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 0, 39, 1,
            ]
        );
        assert_eq!(argsort_descending(&[]), Vec::<usize>::new());
        assert_eq!(argsort_descending(&[7.]), vec![0]);
    }

    #[test]
    fn group_sums_add_in_torchs_order() {
        let big = 16_777_216.0; // 2^24: adding 1 rounds back down.
        // Scalar path: four interleaved partial sums, the fifth item onto the first.
        assert_eq!(torch_sum(&[1., 1., 1., 1., big]), big);
        // Vector path: the tail first, then the lanes.
        assert_eq!(torch_sum(&[1., 1., 1., 1., 1., 1., 1., 1., big]), big);
        assert_eq!(torch_sum(&[1., 2., 3.]), 6.);
        let ramp: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(torch_sum(&ramp), 499_500.);
    }
}
