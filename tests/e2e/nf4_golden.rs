//! The nf4 crate against bitsandbytes 0.50.2 on the CPU, byte for byte (fixtures: `tests/fixtures/nf4`,
//! made by `xtask/fixtures/make_nf4_fixtures.py`).

use half::{bf16, f16};
use nf4::{Absmax, Element, QuantType};

use crate::fixture::{Fixture, fixture_files};

fn same_bits(ours: &[f32], theirs: &[f32], what: &str, case: &str, signed_zero_free: bool) {
    assert_eq!(ours.len(), theirs.len(), "{case}: {what} length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        // FP4 code 8 is +0 in bitsandbytes' code book (and ours) but -0 in its C++ CPU dequantize table; the
        // sign of a zero is the only difference we allow, and only for FP4 dequantized values.
        let equal = a.to_bits() == b.to_bits() || (signed_zero_free && *a == 0.0 && *b == 0.0);
        assert!(
            equal,
            "{case}: {what}[{i}]: ours {a:e} ({:#010x}), bitsandbytes {b:e} ({:#010x})",
            a.to_bits(),
            b.to_bits()
        );
    }
}

#[test]
fn codebooks_equal_bitsandbytes() {
    let f = Fixture::open(&qlora_tests::fixtures_dir().join("nf4/codebooks.safetensors"));
    same_bits(&nf4::NF4_CODEBOOK, &f.f32("nf4"), "nf4 table", "codebooks", false);
    same_bits(&nf4::build_nf4_codebook(nf4::NF4_OFFSET), &f.f32("nf4"), "nf4 construction", "codebooks", false);
    same_bits(&nf4::FP4_CODEBOOK, &f.f32("fp4"), "fp4", "codebooks", false);
    same_bits(&nf4::signed_dynamic_map(), &f.f32("dynamic_signed"), "signed dynamic map", "codebooks", false);
    same_bits(&nf4::unsigned_dynamic_map(), &f.f32("dynamic_unsigned"), "unsigned dynamic map", "codebooks", false);
    // create_normal_map's 256-entry form: the 16 NF4 values with zeros between.
    let normal_map = f.f32("normal_map");
    let nonzero: Vec<f32> = normal_map.iter().copied().filter(|v| *v != 0.0).collect();
    let ours: Vec<f32> = nf4::NF4_CODEBOOK.iter().copied().filter(|v| *v != 0.0).collect();
    same_bits(&ours, &nonzero, "create_normal_map", "codebooks", false);
}

fn check_case<T: Element>(f: &Fixture, case: &str, input: &[T], dequant_ref: &[f32], to_f32: impl Fn(&T) -> f32) {
    let meta = f.metadata();
    let blocksize: usize = meta["blocksize"].parse().unwrap();
    let quant_type: QuantType = meta["quant_type"].parse().unwrap();
    let double_quant = meta["double_quant"] == "true";
    let q = nf4::quantize(input, blocksize, quant_type, double_quant).unwrap_or_else(|e| panic!("{case}: {e}"));

    assert_eq!(q.packed, f.u8("packed"), "{case}: packed codes");
    match &q.absmax {
        Absmax::Plain(absmax) => {
            assert!(!double_quant);
            same_bits(absmax, &f.f32("absmax"), "absmax", case, false);
        }
        Absmax::Double(dq) => {
            assert!(double_quant);
            assert_eq!(dq.codes, f.u8("absmax"), "{case}: double-quantized absmax codes");
            same_bits(&dq.nested_absmax, &f.f32("nested_absmax"), "nested_absmax", case, false);
            same_bits(&[dq.offset], &f.f32("offset"), "offset", case, false);
            same_bits(&dq.code[..], &f.f32("nested_quant_map"), "nested_quant_map", case, false);
            same_bits(&dq.dequantize().unwrap(), &f.f32("absmax_dequant"), "dequantized absmax", case, false);
        }
    }
    let ours: Vec<T> = q.dequantize().unwrap();
    let ours: Vec<f32> = ours.iter().map(to_f32).collect();
    same_bits(&ours, dequant_ref, "dequantized values", case, quant_type == QuantType::Fp4);
}

#[test]
fn quantize_and_dequantize_equal_bitsandbytes_byte_for_byte() {
    let mut cases = 0;
    for path in fixture_files("nf4") {
        let case = path.file_stem().unwrap().to_string_lossy().to_string();
        if case == "codebooks" {
            continue;
        }
        let f = Fixture::open(&path);
        let dequant = f.f32("dequant");
        match f.metadata()["dtype"].as_str() {
            "f32" => check_case::<f32>(&f, &case, &f.f32("input"), &dequant, |v| *v),
            "bf16" => check_case::<bf16>(&f, &case, &f.bf16("input"), &dequant, |v| v.to_f32()),
            "f16" => check_case::<f16>(&f, &case, &f.f16("input"), &dequant, |v| v.to_f32()),
            other => panic!("{case}: unknown dtype {other}"),
        }
        cases += 1;
    }
    assert!(cases >= 25, "only {cases} fixture cases found");
}
