//! imprint: the host command line.

fn main() {
    println!("imprint");
}
