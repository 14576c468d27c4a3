//! `homelab.toml` as an operator might write it, or mistype it: parsing and validating any
//! text must return a spec or an error, never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = homelab::spec::Spec::parse(text, "fuzz.toml") {
        // What apply and render read from a valid spec.
        let _ = spec.net();
        for vm in &spec.vms {
            let _ = spec.vm(vm.name.get_ref());
            let _ = vm.node_name();
        }
    }
});
