"""The mlx5vf variant driver: firmware commands (cmd), migration files (migf), the device (main)."""
