// pgjdbc workload for pgvane's driver matrix (tests/drivers.rs), run as a single-file
// program: java -cp postgresql.jar Workload.java PORT CLIENTS
//
// prepareThreshold=1: statements are prepared on the server (named) from their first use
// and reused across transactions; batches are pipelined; COPY through CopyManager.
import java.io.StringReader;
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;
import org.postgresql.PGConnection;

public class Workload {
    static final int ROUNDS = 40;

    static void check(Object got, Object want, String what) {
        if (!String.valueOf(got).equals(String.valueOf(want)))
            throw new AssertionError(what + ": got " + got + ", want " + want);
    }

    static void client(int port, int n) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + port + "/app?prepareThreshold=1";
        try (Connection c = DriverManager.getConnection(url, "postgres", "pgvane-test")) {
            PreparedStatement plus = c.prepareStatement("SELECT ?::int + 1");
            for (int i = 0; i < ROUNDS; i++) {
                plus.setInt(1, i);
                try (ResultSet r = plus.executeQuery()) { r.next(); check(r.getInt(1), i + 1, "prepared select"); }
                c.setAutoCommit(false);
                try (PreparedStatement ins = c.prepareStatement("INSERT INTO drv VALUES (?, ?)")) {
                    for (int b = 0; b < 5; b++) { ins.setInt(1, n); ins.setString(2, "batch " + i + " " + b); ins.addBatch(); }
                    ins.executeBatch();
                }
                c.commit();
                c.setAutoCommit(true);
            }
            try (PreparedStatement count = c.prepareStatement("SELECT count(*) FROM drv WHERE client = ?")) {
                count.setInt(1, n);
                try (ResultSet r = count.executeQuery()) { r.next(); check(r.getInt(1), ROUNDS * 5, "rows inserted"); }
            }
            StringBuilder rows = new StringBuilder();
            for (int i = 0; i < 2000; i++) rows.append(n).append("\tcopied ").append(i).append('\n');
            long copied = c.unwrap(PGConnection.class).getCopyAPI()
                .copyIn("COPY drv_copy (client, note) FROM STDIN", new StringReader(rows.toString()));
            check(copied, 2000, "rows copied");
        }
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]), clients = Integer.parseInt(args[1]);
        ExecutorService pool = Executors.newFixedThreadPool(clients);
        List<Future<Object>> done = new ArrayList<>();
        for (int n = 0; n < clients; n++) {
            final int id = n;
            done.add(pool.submit(() -> { client(port, id); return null; }));
        }
        for (Future<Object> f : done) f.get();
        pool.shutdown();
        System.out.println("pgjdbc: " + clients + " clients done");
    }
}
