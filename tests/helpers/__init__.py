"""What the tests share: real and on-the-fly data (data_fixtures), 2-process launches (launching), FSDP on
CPU processes (accelerate_on_cpu, run as a script by `accelerate launch`), a local Hub (fake_hub) and
OpenPhenom re-stated from its public code (openphenom_reference, also timed by scripts/benchmark_model.py) and the
scripts imported as modules (scripts)."""
