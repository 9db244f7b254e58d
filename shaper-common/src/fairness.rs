//! How close an admission order is to arrival order: the measure the host replay of the
//! waiting line and the end-to-end storm report share. Host side only (it allocates).

use std::vec::Vec;

/// Rank of each value in `v` (0 for the smallest; ties keep their input order).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = std::vec![0.0; v.len()];
    for (k, &i) in idx.iter().enumerate() {
        r[i] = k as f64;
    }
    r
}

/// Spearman rank correlation of `x` and `y` (0 for fewer than three points or
/// lengths that differ).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    if x.len() < 3 || x.len() != y.len() {
        return 0.0;
    }
    let n = x.len() as f64;
    let (rx, ry) = (ranks(x), ranks(y));
    let d2: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - b) * (a - b)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

#[cfg(test)]
mod tests {
    use super::spearman;

    #[test]
    fn same_order_is_one_reversed_is_minus_one() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&x, &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(spearman(&x[..2], &x[..2]), 0.0);
        assert_eq!(spearman(&x, &x[..3]), 0.0);
    }
}
