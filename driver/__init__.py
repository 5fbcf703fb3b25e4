"""The VFIO migration driver: the kernel's VFIO core (driver.vfio) and the
mlx5vf variant driver (driver.mlx5) on a firmware link, behind a gRPC face
(driver.service) that mirrors the VFIO uAPI."""
