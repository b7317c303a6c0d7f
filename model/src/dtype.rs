//! The libtorch kinds of [`Dtype`]s.

use tch::Kind;
use tramontane_config::Dtype;

/// The libtorch kind weights of `dtype` are held in.
pub fn kind(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::Bf16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
    }
}

/// The dtype of a libtorch kind, when it is one weights may have.
pub fn dtype(kind: Kind) -> Option<Dtype> {
    Dtype::ALL.into_iter().find(|&d| self::kind(d) == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_dtypes_agree() {
        for d in Dtype::ALL {
            assert_eq!(dtype(kind(d)), Some(d));
            assert_eq!(kind(d).elt_size_in_bytes(), d.bytes());
        }
        assert_eq!(dtype(Kind::Int64), None);
    }
}
