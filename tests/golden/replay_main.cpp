// placeholder replaced by the golden replay work
int main() { return 2; }
