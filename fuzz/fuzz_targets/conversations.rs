#![no_main]

use strata_gateway::fuzzing::Target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| Target::Conversations.run(data));
