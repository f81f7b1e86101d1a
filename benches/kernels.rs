//! Criterion benchmarks of the aggregation kernels and the store's header validation.
//! Run with `cargo bench`; throughput is reported as bytes of client data per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use emberfl_core::dtype::Dtype;
use emberfl_core::kernels::{self, Input};
use emberfl_core::store::{self, TensorRef};
use half::bf16;

const LEN: usize = 1 << 20; // 1M parameters = 4 MB per f32 client

fn clients(n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| {
            (0..LEN)
                .map(|j| ((i * 31 + j) % 1000) as f32 * 1e-3)
                .collect()
        })
        .collect()
}

fn bench_weighted_mean(c: &mut Criterion) {
    let mut group = c.benchmark_group("weighted_mean_f32");
    group.sample_size(10);
    for n in [10usize, 100] {
        let xs = clients(n);
        let inputs: Vec<Input> = xs.iter().map(|x| Input::F32(x)).collect();
        let weights: Vec<f64> = (0..n).map(|i| 1.0 + i as f64).collect();
        let mut out = vec![0f32; LEN];
        group.throughput(Throughput::Bytes((n * LEN * 4) as u64));
        for threads in [1usize, 2] {
            group.bench_with_input(BenchmarkId::new(format!("{threads}t"), n), &n, |b, _| {
                b.iter(|| {
                    kernels::weighted_sum(&inputs, &weights, true, &mut out, threads, true).unwrap()
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("weighted_mean_bf16");
    group.sample_size(10);
    let xs: Vec<Vec<bf16>> = clients(10)
        .into_iter()
        .map(|x| x.into_iter().map(bf16::from_f32).collect())
        .collect();
    let inputs: Vec<Input> = xs.iter().map(|x| Input::BF16(x)).collect();
    let weights = vec![1.0; 10];
    let mut out = vec![0f32; LEN];
    group.throughput(Throughput::Bytes((10 * LEN * 2) as u64));
    group.bench_function("1t/10", |b| {
        b.iter(|| kernels::weighted_sum(&inputs, &weights, true, &mut out, 1, true).unwrap())
    });
    group.finish();
}

fn bench_store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    // 200 tensors, as in a mid-sized model's state dict.
    let data = vec![0u8; 4 * 1024];
    let names: Vec<String> = (0..200).map(|i| format!("layer{i}.weight")).collect();
    let tensors: Vec<TensorRef> = names
        .iter()
        .map(|n| TensorRef {
            name: n,
            dtype: Dtype::F32,
            shape: &[32, 32],
            data: &data,
        })
        .collect();
    store::write_file(&path, &tensors, None, false).unwrap();
    let mut group = c.benchmark_group("store");
    group.bench_function("open_and_validate_200_tensors", |b| {
        b.iter(|| store::MappedFile::open(&path).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench_weighted_mean, bench_store);
criterion_main!(benches);
