//! imprint-appliance: PID 1 of the imprint live image.

fn main() {
    println!("imprint-appliance");
}
