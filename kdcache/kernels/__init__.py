"""kdcache.kernels"""
