//! The wire's element types as host values: reading one from its
//! little-endian bytes, writing one, and rounding an f32 to it. Each is its
//! own type, so that the codec's loops are compiled once per element type
//! (with the choice of type out of the loop, the compiler vectorises them).

/// One element type of the wire.
pub(crate) trait Element {
    const BYTES: usize;
    /// The value of `bytes` (`BYTES` of them, little-endian).
    fn read(bytes: &[u8]) -> f32;
    /// `value` rounded to this type, to nearest even, as little-endian bytes.
    fn write(value: f32, bytes: &mut [u8]);
    /// `value` rounded to this type, to nearest even, back as an f32.
    fn round(value: f32) -> f32;
}

pub(crate) struct F32;
pub(crate) struct Bf16;
pub(crate) struct F16;

impl Element for F32 {
    const BYTES: usize = 4;
    #[inline(always)]
    fn read(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn write(value: f32, bytes: &mut [u8]) {
        bytes.copy_from_slice(&value.to_le_bytes());
    }
    #[inline(always)]
    fn round(value: f32) -> f32 {
        value
    }
}

/// The bf16 bits of `value`, rounded to nearest even; a NaN stays a (quiet)
/// NaN. The same bits as `half::bf16::from_f32`, without its branches.
#[inline(always)]
fn bf16_bits(value: f32) -> u16 {
    let x = value.to_bits();
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    let nan = ((x >> 16) as u16) | 0x0040;
    if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

impl Element for Bf16 {
    const BYTES: usize = 2;
    #[inline(always)]
    fn read(b: &[u8]) -> f32 {
        f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
    }
    #[inline(always)]
    fn write(value: f32, bytes: &mut [u8]) {
        bytes.copy_from_slice(&bf16_bits(value).to_le_bytes());
    }
    #[inline(always)]
    fn round(value: f32) -> f32 {
        f32::from_bits(u32::from(bf16_bits(value)) << 16)
    }
}

impl Element for F16 {
    const BYTES: usize = 2;
    #[inline(always)]
    fn read(b: &[u8]) -> f32 {
        half::f16::from_le_bytes([b[0], b[1]]).to_f32()
    }
    #[inline(always)]
    fn write(value: f32, bytes: &mut [u8]) {
        bytes.copy_from_slice(&half::f16::from_f32(value).to_le_bytes());
    }
    #[inline(always)]
    fn round(value: f32) -> f32 {
        half::f16::from_f32(value).to_f32()
    }
}

/// Calls `$body` with `$T` the element type of `$dtype`.
macro_rules! with_element {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            tramontane_config::Dtype::F32 => {
                type $T = $crate::elements::F32;
                $body
            }
            tramontane_config::Dtype::Bf16 => {
                type $T = $crate::elements::Bf16;
                $body
            }
            tramontane_config::Dtype::F16 => {
                type $T = $crate::elements::F16;
                $body
            }
        }
    };
}
pub(crate) use with_element;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The same bits as half's conversion for every f32, NaN included.
        #[test]
        fn bf16_rounds_as_half_does(bits in any::<u32>()) {
            let value = f32::from_bits(bits);
            prop_assert_eq!(bf16_bits(value), half::bf16::from_f32(value).to_bits());
            let mut bytes = [0u8; 2];
            Bf16::write(value, &mut bytes);
            prop_assert_eq!(Bf16::read(&bytes).to_bits(), half::bf16::from_f32(value).to_f32().to_bits());
            prop_assert_eq!(Bf16::round(value).to_bits(), half::bf16::from_f32(value).to_f32().to_bits());
        }
    }

    #[test]
    fn bf16_rounds_ties_to_even_and_overflows_to_infinity() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even is 1.
        assert_eq!(Bf16::round(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is the latter.
        assert_eq!(Bf16::round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(Bf16::round(f32::MAX), f32::INFINITY);
        assert_eq!(Bf16::round(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert!(Bf16::round(f32::NAN).is_nan());
    }
}
