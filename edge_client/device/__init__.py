"""Device measurements for the profiler and the energy meters.

host       the machine as a root directory + external commands (fake trees in tests)
identity   model, vendor, platform class;  cpu  cores, clocks, throttling;  memory  cgroup-capped
battery    battery state;  thermal  zone temperatures;  compute  matmul GFLOPS, LoRA step time
sources/   power sources (RAPL, Jetson INA3221, Pi 5 PMIC, battery, estimate)
energy     EnergyMeter: sampled, integrated, labelled energy of a timed window
profile    collect_profile() -> the "hetlora-profile" document
"""
