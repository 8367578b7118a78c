//! Operator overloading: `&a + &b`, `a - b`, `-&a`, `&a * 2.0`, `2.0 / &a`.
//!
//! Operators cannot return errors, so a rejected one records the failure in the graph (with the
//! line of the operator); `eval` and [`crate::Graph::end`] report it.

use std::ops::{Add, Div, Mul, Neg, Sub};
use std::panic::Location;

use corvid_kernels::Op;
use corvid_kernels::op::{BinaryOp, UnaryOp};

use crate::error::Site;
use crate::tensor::Tensor;

macro_rules! binary_operator {
    ($trait:ident, $method:ident, $op:ident) => {
        impl $trait<&Tensor> for &Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: &Tensor) -> Tensor {
                self.graph().apply_or_record(
                    Op::Binary(BinaryOp::$op),
                    &[self, rhs],
                    Site(Location::caller()),
                )
            }
        }

        impl $trait<Tensor> for Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: Tensor) -> Tensor {
                $trait::$method(&self, &rhs)
            }
        }

        impl $trait<&Tensor> for Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: &Tensor) -> Tensor {
                $trait::$method(&self, rhs)
            }
        }

        impl $trait<Tensor> for &Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: Tensor) -> Tensor {
                $trait::$method(self, &rhs)
            }
        }

        impl $trait<f32> for &Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: f32) -> Tensor {
                let at = Site(Location::caller());
                let s = self.graph().scalar(rhs);
                self.graph()
                    .apply_or_record(Op::Binary(BinaryOp::$op), &[self, &s], at)
            }
        }

        impl $trait<f32> for Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: f32) -> Tensor {
                $trait::$method(&self, rhs)
            }
        }

        impl $trait<&Tensor> for f32 {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: &Tensor) -> Tensor {
                let at = Site(Location::caller());
                let s = rhs.graph().scalar(self);
                rhs.graph()
                    .apply_or_record(Op::Binary(BinaryOp::$op), &[&s, rhs], at)
            }
        }

        impl $trait<Tensor> for f32 {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: Tensor) -> Tensor {
                $trait::$method(self, &rhs)
            }
        }
    };
}

binary_operator!(Add, add, Add);
binary_operator!(Sub, sub, Sub);
binary_operator!(Mul, mul, Mul);
binary_operator!(Div, div, Div);

impl Neg for &Tensor {
    type Output = Tensor;
    #[track_caller]
    fn neg(self) -> Tensor {
        self.graph()
            .apply_or_record(Op::Unary(UnaryOp::Neg), &[self], Site(Location::caller()))
    }
}

impl Neg for Tensor {
    type Output = Tensor;
    #[track_caller]
    fn neg(self) -> Tensor {
        -&self
    }
}
