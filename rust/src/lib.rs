//! emberfl's Rust core: a memory-mapped safetensors store and flat-vector aggregation
//! kernels. The pure-Rust modules build and test without Python; the `python`
//! feature adds the `emberfl._core` extension module.

pub mod dtype;
pub mod exact;
pub mod header;
pub mod kernels;
pub mod store;

#[cfg(feature = "python")]
mod python;
