//! An Assignment's install plan (JSON inside the directive), fuzzed directly so the
//! mutations reach the plan checks rather than breaking protobuf framing: parsing,
//! checking and rendering it must return a value or an error, never panic.

#![no_main]

use homelab_agent::k3s::InstallPlan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match InstallPlan::for_directive(u64::MAX, "server", text) {
        Ok(plan) => {
            let _ = plan.render_config();
            let _ = plan.config_hash();
            let _ = plan.fingerprint();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
