"""kdcache.student_train"""
