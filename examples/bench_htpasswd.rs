//! A users-file line for the benchmark's basic-auth rows: `USER:` and the bcrypt hash (cost 10,
//! what `htpasswd -B` makes by default) of PASSWORD, so limen and nginx check the same hash.
//! `cargo run --release --example bench_htpasswd -- bench bench`

fn main() {
    let mut args = std::env::args().skip(1);
    let user = args.next().unwrap_or_else(|| "bench".to_owned());
    let password = args.next().unwrap_or_else(|| "bench".to_owned());
    match bcrypt::hash(password, 10) {
        Ok(hash) => println!("{user}:{hash}"),
        Err(e) => {
            eprintln!("bench_htpasswd: {e}");
            std::process::exit(1);
        }
    }
}
