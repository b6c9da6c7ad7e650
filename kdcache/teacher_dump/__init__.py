"""kdcache.teacher_dump"""
