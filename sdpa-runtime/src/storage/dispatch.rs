//! dtype dispatch, written once: the one `match` over the element types
//! that every per-dtype buffer enum of [`crate::storage`] goes through.
//!
//! Each buffer enum (`HostData`, `CudaOwned`, ...) has one variant per
//! element type, named as [`DType`](crate::DType)'s variants are (`F32`,
//! `F16`, `BF16`), each holding that type's buffer. [`dispatch!`] expands
//! its body once per variant, so the body is generic over the element type
//! without a trait bound (the storage sits below [`crate::Element`]):
//!
//! - `dispatch!(value, Enum(x) => body)`: `body` with `x` bound to the
//!   buffer, whatever the variant; every arm has `body`'s type.
//! - `dispatch!(value, Enum(x) -> Out(body))`: the same variant of `Out`,
//!   holding `body`: maps a buffer enum to another one of the same dtype.
//! - `dispatch!(value, Enum(_) => dtype)`: the [`DType`](crate::DType)
//!   of the variant.
//! - `dispatch!(dtype, T -> Out(body))`: the variant of `Out` for a
//!   [`DType`](crate::DType), holding `body`, where `T` names the element
//!   type.
//! - `dispatch!(dtype, T => body)`: `body` for a [`DType`](crate::DType),
//!   where `T` names the element type; every arm has `body`'s type (calls a
//!   generic function with the element type of a runtime `DType`).
//!
//! Adding an element type means adding one arm to each form here.

/// See the [module docs](self).
macro_rules! dispatch {
    ($value:expr, $enum:ident(_) => dtype) => {
        match $value {
            $enum::F32(_) => $crate::DType::F32,
            $enum::F16(_) => $crate::DType::F16,
            $enum::BF16(_) => $crate::DType::BF16,
        }
    };
    ($value:expr, $enum:ident($x:ident) -> $out:ident($body:expr)) => {
        match $value {
            $enum::F32($x) => $out::F32($body),
            $enum::F16($x) => $out::F16($body),
            $enum::BF16($x) => $out::BF16($body),
        }
    };
    ($value:expr, $enum:ident($x:ident) => $body:expr) => {
        match $value {
            $enum::F32($x) => $body,
            $enum::F16($x) => $body,
            $enum::BF16($x) => $body,
        }
    };
    ($dtype:expr, $t:ident -> $out:ident($body:expr)) => {
        match $dtype {
            $crate::DType::F32 => {
                type $t = f32;
                $out::F32($body)
            }
            $crate::DType::F16 => {
                type $t = ::half::f16;
                $out::F16($body)
            }
            $crate::DType::BF16 => {
                type $t = ::half::bf16;
                $out::BF16($body)
            }
        }
    };
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::DType::F16 => {
                type $t = ::half::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $t = ::half::bf16;
                $body
            }
        }
    };
}

pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use crate::DType;

    #[derive(Debug, PartialEq)]
    enum Lens {
        F32(usize),
        F16(usize),
        BF16(usize),
    }

    #[derive(Debug, PartialEq)]
    enum Bufs {
        F32(Vec<f32>),
        F16(Vec<f16>),
        BF16(Vec<bf16>),
    }

    #[test]
    fn every_form_reaches_every_dtype() {
        let bufs = [
            Bufs::F32(vec![0.0]),
            Bufs::F16(vec![f16::ZERO; 2]),
            Bufs::BF16(vec![bf16::ZERO; 3]),
        ];
        let lens: Vec<usize> = bufs
            .iter()
            .map(|b| dispatch!(b, Bufs(v) => v.len()))
            .collect();
        assert_eq!(lens, [1, 2, 3]);
        let mapped: Vec<Lens> = bufs
            .iter()
            .map(|b| dispatch!(b, Bufs(v) -> Lens(v.len())))
            .collect();
        assert_eq!(mapped, [Lens::F32(1), Lens::F16(2), Lens::BF16(3)]);
        let dtypes: Vec<DType> = bufs
            .iter()
            .map(|b| dispatch!(b, Bufs(_) => dtype))
            .collect();
        assert_eq!(dtypes, [DType::F32, DType::F16, DType::BF16]);
        for (dtype, b) in dtypes.into_iter().zip(&bufs) {
            let n = dispatch!(b, Bufs(v) => v.len());
            let made = dispatch!(dtype, T -> Bufs(vec![T::default(); n]));
            assert_eq!(&made, b);
            assert_eq!(
                dispatch!(dtype, T => std::mem::size_of::<T>()),
                dtype.size_bytes()
            );
        }
    }
}
